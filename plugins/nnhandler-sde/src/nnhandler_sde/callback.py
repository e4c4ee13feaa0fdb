"""``ScoreSDE``: the SDE, the sampler and the sampling random stream as a state provider."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from nnhandler import Callback, NNHandler

from .sampler import EulerMaruyamaSampler
from .sde import SDE, sde_from_config

__all__ = ["STATE_KEY", "ScoreSDE", "find_score_sde"]

#: The state key of an unnamed :class:`ScoreSDE`; named ones use ``"sde:<name>"``.
STATE_KEY = "sde"


class ScoreSDEConfig(BaseModel):
    """Validated arguments of :class:`ScoreSDE` besides the SDE and the sampler."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    data_shape: tuple[Annotated[int, Field(ge=1)], ...] = Field(min_length=1)
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    name: Annotated[str, Field(min_length=1, pattern=r"^[^:]+$")] | None = None
    sample_every: Annotated[int, Field(ge=1)] | None = None
    num_samples: Annotated[int, Field(ge=1)] = 256


class ScoreSDE(Callback):
    """Attach a score-based SDE to a handler and keep its configuration and state in every
    checkpoint.

    Args:
        sde: a :class:`~nnhandler_sde.VPSDE` or :class:`~nnhandler_sde.VESDE`.
        data_shape: the shape of one sample (``(2,)`` for points in the plane).
        sampler: defaults to ``EulerMaruyamaSampler()``.
        seed: seeds the sampler's own ``torch.Generator`` (training's random streams are
            never touched by sampling).
        name: for several SDEs on one handler; the state key is ``"sde"`` or ``"sde:<name>"``.
        sample_every: draw ``num_samples`` samples after every N-th epoch and add
            ``sample_mean`` and ``sample_std`` to the epoch logs.
        num_samples: how many samples ``sample_every`` draws.

    The checkpoint holds the SDE and sampler configuration, the generator's state and the count
    of samples drawn. :meth:`load_state_dict` restores all of it — the configuration too, so the
    model is sampled with the SDE it was trained for (a warning says when that replaces a
    different configuration given to this instance). With the plugin installed,
    ``NNHandler.load(path)`` re-creates this callback by itself (entry point
    ``nnhandler.plugins``); :func:`find_score_sde` returns it.
    """

    def __init__(
        self,
        sde: SDE,
        data_shape: Sequence[int],
        sampler: EulerMaruyamaSampler | None = None,
        *,
        seed: int = 0,
        name: str | None = None,
        sample_every: int | None = None,
        num_samples: int = 256,
    ) -> None:
        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be a VPSDE or VESDE, got {sde!r}")
        if sampler is not None and not isinstance(sampler, EulerMaruyamaSampler):
            raise TypeError(f"sampler must be an EulerMaruyamaSampler, got {sampler!r}")
        self.options = ScoreSDEConfig(data_shape=tuple(data_shape), seed=seed, name=name,
                                      sample_every=sample_every, num_samples=num_samples)
        self.sde = sde
        self.sampler = sampler if sampler is not None else EulerMaruyamaSampler()
        self.generator = torch.Generator().manual_seed(seed)
        self.samples_drawn = 0

    @property
    def state_key(self) -> str:
        name = self.options.name
        return STATE_KEY if name is None else f"{STATE_KEY}:{name}"

    def __repr__(self) -> str:
        return (f"ScoreSDE({self.sde!r}, data_shape={self.options.data_shape}, "
                f"sampler={self.sampler!r}, seed={self.options.seed}, name={self.options.name!r})")

    # -- sampling ------------------------------------------------------------------------------
    def sample(self, handler: NNHandler, num_samples: int, *, use_ema: bool = True) -> torch.Tensor:
        """``num_samples`` samples from the handler's score model ``model(x, t)``.

        Uses the EMA weights when the handler has an EMA (and ``use_ema``), else the raw
        weights; the model is put in eval mode while sampling and restored afterwards.
        """
        if type(num_samples) is not int or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        averaged = handler.ema_model
        module = averaged.module if use_ema and averaged is not None else handler.module
        was_training = module.training
        module.eval()
        try:
            samples = self.sampler.sample(lambda x, t: module(x, t), self.sde,
                                          (num_samples, *self.options.data_shape),
                                          self.generator, device=handler.device)
        finally:
            module.train(was_training)
        self.samples_drawn += num_samples
        return samples

    def on_epoch_end(
        self, handler: NNHandler, epoch: int, logs: dict[str, Any], **kwargs: Any
    ) -> None:
        every = self.options.sample_every
        if every is not None and epoch % every == 0:
            samples = self.sample(handler, self.options.num_samples)
            logs["sample_mean"] = float(samples.mean())
            logs["sample_std"] = float(samples.std())

    # -- StateProvider -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "sde": self.sde.config(),
            "sampler": self.sampler.config(),
            **self.options.model_dump(mode="json"),
            "generator": self.generator.get_state(),
            "samples_drawn": self.samples_drawn,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore configuration, generator and count (see the class docstring)."""
        sde, sampler, options = _configuration(state)
        if (sde, sampler, options) != (self.sde, self.sampler, self.options):
            warnings.warn(f"{self!r}: the checkpoint's configuration replaces this instance's: "
                          f"{sde!r}, {sampler!r}, {options!r}", stacklevel=2)
        generator = torch.Generator()
        generator.set_state(state["generator"].cpu())
        self.sde, self.sampler, self.options = sde, sampler, options
        self.generator = generator
        self.samples_drawn = int(state["samples_drawn"])

    @classmethod
    def from_state(cls, state_key: str, state: dict[str, Any]) -> ScoreSDE:
        """The instance a checkpoint's ``state`` describes (the plugin's provider factory);
        the handler then restores the generator and the count into it."""
        sde, sampler, options = _configuration(state)
        instance = cls(sde, options.data_shape, sampler, **options.model_dump(
            exclude={"data_shape"}))
        if instance.state_key != state_key:
            raise ValueError(f"state {state_key!r} holds the SDE named {options.name!r}")
        return instance


def _configuration(state: dict[str, Any]) -> tuple[SDE, EulerMaruyamaSampler, ScoreSDEConfig]:
    options = ScoreSDEConfig(
        data_shape=tuple(state["data_shape"]), seed=state["seed"], name=state["name"],
        sample_every=state["sample_every"], num_samples=state["num_samples"],
    )
    sampler = EulerMaruyamaSampler.from_config(state["sampler"])
    return sde_from_config(state["sde"]), sampler, options


def find_score_sde(handler: NNHandler, name: str | None = None) -> ScoreSDE:
    """The :class:`ScoreSDE` callback on ``handler`` (the one called ``name``)."""
    for callback in handler.callbacks:
        if isinstance(callback, ScoreSDE) and callback.options.name == name:
            return callback
    raise LookupError(f"no ScoreSDE{'' if name is None else f' named {name!r}'} on {handler!r}; "
                      "add one with handler.add_callback(ScoreSDE(...))")
