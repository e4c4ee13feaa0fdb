"""The configuration a checkpoint records (state key ``"config"``), in one place.

:func:`config_dict` writes it from the parts that own each entry (the model's set-up, the
:class:`~nnhandler.optimization.Optimization`, the loaders, the training settings, which
auto-saver is the handler's own); its schema is
:class:`~nnhandler.checkpoint.content.ConfigRecord`. :class:`ModelSetup` is what built the
model (class, arguments, compilation, parallelism), and builds it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checkpoint.content import ConfigRecord, check_config
from .checkpoint.refs import NotReferenceableError, encode_value
from .config import ParallelConfig, TrainSettings
from .data import Loaders
from .distributed import DistributedContext
from .errors import ConfigurationError
from .optimization import Optimization
from .recorded import maybe_reference
from .sharding import apply_fsdp, has_dtensor_parameters
from .skipped_init import construct

__all__ = ["ConfigState", "ModelSetup", "config_dict", "seeded"]


@dataclass(frozen=True)
class ModelSetup:
    """What builds the model: its class and arguments (``unstored``: those no checkpoint can
    record, which ``load`` must be given again), ``torch.compile`` and the parallelism."""

    model_class: type[nn.Module]
    model_kwargs: dict[str, Any]
    unstored: frozenset[str]
    compile_model: bool | Mapping[str, Any]
    parallel: ParallelConfig

    @classmethod
    def checked(cls, model_class: type[nn.Module], model_kwargs: dict[str, Any],
                compile_model: bool | Mapping[str, Any], parallel: ParallelConfig,
                logger: logging.Logger) -> ModelSetup:
        """The set-up, with a warning for each model argument a checkpoint cannot record."""
        unstored = set()
        for name, value in model_kwargs.items():
            try:
                encode_value(value, f"model argument {name!r}")
            except NotReferenceableError as error:
                unstored.add(name)
                logger.warning("%s; load() will need model_kwargs={%r: ...}", error, name)
        return cls(model_class, model_kwargs, frozenset(unstored), compile_model, parallel)

    def build(self, device: torch.device, context: DistributedContext,
              seed: int | None = None) -> tuple[nn.Module, nn.Module]:
        """``(module, model)``: the constructed module on ``device`` (FSDP2-sharded with
        ``"fsdp"``) and the model as trained (``torch.compile``- and DDP-wrapped as set up).

        With a ``seed``, the model is constructed under it (see :func:`seeded`)."""
        with seeded(seed, device):
            module = construct(self.model_class, self.model_kwargs,
                               lambda: seeded(seed, device)).to(device)
        if self.parallel.parallelism == "fsdp":
            module = apply_fsdp(module, self.parallel.fsdp_units, device, context)
        model: nn.Module = module
        if self.compile_model:
            options = dict(self.compile_model) if isinstance(self.compile_model, Mapping) else {}
            model = torch.compile(model, **options)  # type: ignore[assignment]
        if context.enabled and self.parallel.parallelism == "ddp":
            if has_dtensor_parameters(module):
                raise ConfigurationError(
                    f"{self.model_class.__qualname__} holds DTensor parameters, which DDP cannot "
                    "wrap: pass parallelism='none' (the model distributes itself) or 'fsdp'")
            device_ids = [device.index] if device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return module, model

    def records(self) -> dict[str, Any]:
        """The configuration entries a checkpoint records of the model's set-up."""
        stored_kwargs = {k: v for k, v in self.model_kwargs.items() if k not in self.unstored}
        return {
            "model_class": maybe_reference(self.model_class),
            "model_kwargs": encode_value(stored_kwargs, "model argument"),
            "model_kwargs_unstored": sorted(self.unstored),
            "compile_model": encode_value(self.compile_model, "compile_model"),
            "parallelism": self.parallel.parallelism,
            "fsdp_units": [maybe_reference(unit) for unit in self.parallel.fsdp_units],
        }


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the block with torch's CPU generator (and ``device``'s, on CUDA) seeded with
    ``seed``, and give the caller's streams back afterwards (``torch.random.fork_rng``): the
    same seed builds the same initial weights in every process and every run, and a script's
    own random numbers do not depend on whether it passed one. ``None``: the block runs on the
    caller's streams, untouched."""
    if seed is None:
        yield
        return
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        # not torch.manual_seed: on CUDA it also seeds every other GPU (or, before CUDA is
        # initialised, queues that for later), which the fork would not give back
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def config_dict(setup: ModelSetup, optimization: Optimization, loaders: Loaders,
                settings: TrainSettings, own_saver_key: str | None) -> dict[str, Any]:
    """The ``"config"`` state of a handler (its schema:
    :class:`~nnhandler.checkpoint.content.ConfigRecord`)."""
    return {
        **setup.records(),
        **optimization.records(),
        "loaders": loaders.state(),
        "train_settings": settings.model_dump(),
        "own_autosave": own_saver_key,
    }


class ConfigState:
    """The handler's configuration as a state provider (``"config"``).

    :meth:`NNHandler.load` builds a handler from it; restoring it into a live handler applies
    what can change without rebuilding (``apply``: the training defaults and remembered
    loader arguments).
    """

    state_key = "config"

    def __init__(self, collect: Callable[[], dict[str, Any]],
                 apply: Callable[[ConfigRecord], None]) -> None:
        self.collect, self.apply = collect, apply

    def state_dict(self) -> dict[str, Any]:
        return self.collect()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.apply(check_config(state, "<restored state>"))
