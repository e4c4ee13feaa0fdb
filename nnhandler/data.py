"""The data a handler trains and validates on: datasets with their DataLoader arguments.

Datasets are never saved; their loader arguments are (``state["config"].loaders``) and a
loaded handler remembers them, so ``set_train_loader(dataset)`` after ``load`` needs only the
dataset. Function-valued arguments (``collate_fn``, ``worker_init_fn``) are never taken from a
file: a warning names each one the caller does not pass again. nnhandler provides the sampler:
the training order depends only on the run's seed and the absolute epoch (exact resume).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from torch.utils.data import DataLoader, Dataset

from .checkpoint.content import LoaderRecord
from .checkpoint.refs import Unrestored, decode_arguments
from .checkpoint.schema import validate
from .config import LoaderConfig, validate_call
from .distributed import DistributedContext
from .errors import ConfigurationError
from .preemption import IgnoreInWorkers
from .recorded import storable
from .samplers import EpochDistributedSampler, EpochShuffleSampler, ShardSampler

__all__ = ["LoaderSpec", "Loaders", "RememberedArguments"]


@dataclass(frozen=True)
class LoaderSpec:
    """A dataset plus the DataLoader arguments it was set with."""

    dataset: Dataset[Any]
    config: LoaderConfig
    extra: dict[str, Any]

    def state(self) -> dict[str, Any]:
        """The loader arguments that can be recorded (e.g. a lambda ``collate_fn`` cannot)."""
        return {"config": self.config.model_dump(),
                "extra": {k: v for k, v in self.extra.items() if storable(v)}}


@dataclass(frozen=True)
class RememberedArguments:
    """The loader arguments a loaded checkpoint recorded: nnhandler's own (``config``), the
    other DataLoader arguments it could supply (``extra``) and those it could not
    (``unrestored``: functions, which the caller passes again)."""

    config: dict[str, Any]
    extra: dict[str, Any]
    unrestored: tuple[Unrestored, ...]


class Loaders:
    """The training and validation loaders of one handler (``"train"`` and ``"val"``)."""

    __slots__ = ("_logger", "_remembered", "_specs")

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._specs: dict[str, LoaderSpec] = {}
        self._remembered: dict[str, RememberedArguments] = {}

    def __contains__(self, which: object) -> bool:
        return which in self._specs

    def spec(self, which: str) -> LoaderSpec | None:
        """The dataset and arguments of ``"train"`` or ``"val"`` (``None`` when not set)."""
        return self._specs.get(which)

    @property
    def specs(self) -> Mapping[str, LoaderSpec]:
        """Every loader set, by ``"train"`` / ``"val"`` (a read-only view)."""
        return MappingProxyType(self._specs)

    @property
    def remembered(self) -> Mapping[str, RememberedArguments]:
        """The arguments remembered from a loaded checkpoint (a read-only view)."""
        return MappingProxyType(self._remembered)

    def set(self, which: str, dataset: Dataset[Any] | None, kwargs: Mapping[str, Any]) -> None:
        """``set_<which>_loader(dataset, **kwargs)``: checked completely (a DataLoader is built
        once) before anything changes."""
        if dataset is None:
            raise ConfigurationError(f"set_{which}_loader needs a dataset")
        if isinstance(dataset, DataLoader):
            raise TypeError(f"set_{which}_loader takes a Dataset, not a DataLoader; pass the "
                            "dataset and DataLoader keyword arguments")
        remembered = self._remembered.get(which)
        merged = ({**remembered.config, **self._remembered_extra(which, remembered, kwargs)}
                  if remembered is not None else {})
        merged.update(kwargs)
        own = {k: merged.pop(k) for k in list(merged) if k in LoaderConfig.model_fields}
        config = validate_call(LoaderConfig, f"set_{which}_loader", own)
        if "sampler" in merged or "batch_sampler" in merged:
            raise ConfigurationError(
                f"set_{which}_loader: nnhandler provides the sampler (its shuffle order depends "
                "only on the seed and the epoch, which exact resume needs); use shuffle=True/False"
            )
        # fail now, naming the bad argument, rather than at the start of train()
        DataLoader(dataset, batch_size=config.batch_size, drop_last=config.drop_last,
                   **config.dataloader_arguments(), **merged)
        self._specs[which] = LoaderSpec(dataset, config, merged)

    def _remembered_extra(self, which: str, remembered: RememberedArguments,
                          given: Mapping[str, Any]) -> dict[str, Any]:
        for item in remembered.unrestored:
            if item.name not in given:
                self._logger.warning(
                    "set_%s_loader: the checkpoint recorded %s=%s, which is not restored (%s); "
                    "pass set_%s_loader(..., %s=...) again", which, item.name, item.reference,
                    item.reason, which, item.name)
        return dict(remembered.extra)

    def remember(self, records: Mapping[Literal["train", "val"], LoaderRecord],
                 source: str) -> None:
        """Take the loader arguments a checkpoint recorded (validated; function-valued ones
        are set aside and reported, see :meth:`warn_unrestored`)."""
        remembered: dict[str, RememberedArguments] = {}
        for which, loader in records.items():
            where = f"state['config'].loaders.{which}"
            config = validate(LoaderConfig, loader.config, where=f"{where}.config", path=source)
            extra, unrestored = decode_arguments(loader.extra, f"{where}.extra")
            remembered[which] = RememberedArguments(config.model_dump(), extra, unrestored)
        self._remembered = remembered

    def warn_unrestored(self) -> None:
        """One warning per remembered argument that the checkpoint could not supply."""
        for which, remembered in self._remembered.items():
            for item in remembered.unrestored:
                self._logger.warning(
                    "%s loader argument %s=%s is not restored (%s); pass it to set_%s_loader "
                    "again", which, item.name, item.reference, item.reason, which)

    def state(self) -> dict[str, Any]:
        """What the configuration records of the loaders."""
        return {which: spec.state() for which, spec in self._specs.items()
                if storable(spec.state())}

    def build(self, which: str, seed: int, context: DistributedContext, device_type: str,
              watched: Iterable[Any]) -> DataLoader[Any] | None:
        """The DataLoader for ``which`` (``None`` when none is set): nnhandler's sampler for
        the run's ``seed``, pinned memory on CUDA, and workers that ignore the ``watched``
        signals of emergency saves."""
        spec = self._specs.get(which)
        if spec is None:
            return None
        length = len(spec.dataset)  # type: ignore[arg-type]
        sampler: Any
        if which == "train" and context.enabled:
            sampler = EpochDistributedSampler(spec.dataset, num_replicas=context.world_size,
                                              rank=context.rank, shuffle=spec.config.shuffle,
                                              seed=seed)
        elif which == "train":
            sampler = EpochShuffleSampler(length, seed, spec.config.shuffle)
        elif context.enabled:
            sampler = ShardSampler(length, context.rank, context.world_size)
        else:
            sampler = None
        extra = {**spec.config.dataloader_arguments(), **spec.extra}
        if device_type == "cuda":
            extra.setdefault("pin_memory", True)
        signals = tuple(watched)
        if signals and extra.get("num_workers", 0):
            extra["worker_init_fn"] = IgnoreInWorkers(signals, extra.get("worker_init_fn"))
        return DataLoader(spec.dataset, batch_size=spec.config.batch_size, sampler=sampler,
                          drop_last=spec.config.drop_last, **extra)
