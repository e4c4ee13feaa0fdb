"""``EarlyStopping``: stop training when a monitored value stops improving."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import ConfigurationError
from .base import Callback

if TYPE_CHECKING:
    from ..handler import NNHandler

__all__ = ["EarlyStopping", "EarlyStoppingConfig"]


class EarlyStoppingConfig(BaseModel):
    """Validated arguments of :class:`EarlyStopping`."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")  # as config.py's models

    monitor: Annotated[str, Field(min_length=1)] = "val_loss"
    mode: Literal["min", "max"] = "min"
    patience: Annotated[int, Field(ge=1)] = 3
    min_delta: Annotated[float, Field(ge=0.0, allow_inf_nan=False, strict=False)] = 0.0

    @field_validator("min_delta", mode="before")
    @classmethod
    def _numbers_only(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"min_delta must be a number, got {value!r}")
        return value


class EarlyStopping(Callback):
    """Stop training when ``monitor`` has not improved for ``patience`` counted epochs.

    Args:
        monitor: the epoch-log key to watch (``"val_loss"``, ``"val_accuracy"``, ``"loss"``, or a
            key an earlier callback adds).
        mode: ``"min"`` (lower is better) or ``"max"``.
        patience: after this many counted epochs in a row without improvement (``>= 1``)
            training stops.
        min_delta: an improvement must beat the best value by more than this.

    Rules: an epoch whose logs lack ``monitor`` (one that did not validate, for a ``val_``
    key) does not count at all. A NaN is never an improvement (it counts as an epoch without
    one). When the patience runs out the callback calls ``handler.request_stop()``: training
    stops after this epoch (and an ``interval=-1`` auto-save saves it). A ``monitor`` missing on
    an epoch that *did* validate (or a training key missing on any epoch) is a
    :class:`~nnhandler.ConfigurationError` naming the keys that exist — a misspelt key never
    turns early stopping off silently. Register it after callbacks whose log keys it monitors.

    The counters carry over from one ``train`` call to the next (and across a resume, which
    is what makes it exact); :meth:`reset` starts afresh.

    A :class:`~nnhandler.StateProvider` (``state_key`` ``"early_stopping:<monitor>"``): the best
    value, its epoch, the count of epochs without improvement and the stop epoch are in every
    checkpoint, so a resumed run stops exactly where the uninterrupted one would.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: Literal["min", "max"] = "min",
        patience: int = 3,
        min_delta: float = 0.0,
    ) -> None:
        self.config = EarlyStoppingConfig(monitor=monitor, mode=mode, patience=patience,
                                          min_delta=min_delta)
        self.best = math.inf
        self.best_epoch: int | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None
        self.reset()

    @property
    def state_key(self) -> str:
        return f"early_stopping:{self.config.monitor}"

    def __repr__(self) -> str:
        c = self.config
        return (f"EarlyStopping(monitor={c.monitor!r}, mode={c.mode!r}, patience={c.patience}, "
                f"min_delta={c.min_delta})")

    def reset(self) -> None:
        """Forget the best value and the count of epochs without improvement."""
        self.best = math.inf if self.config.mode == "min" else -math.inf
        self.best_epoch = self.stopped_epoch = None
        self.wait = 0

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta`` (never a NaN)."""
        if math.isnan(value):
            return False
        if self.config.mode == "min":
            return value < self.best - self.config.min_delta
        return value > self.best + self.config.min_delta

    def on_epoch_end(
        self, handler: NNHandler, epoch: int, logs: dict[str, Any], **kwargs: Any
    ) -> None:
        monitor = self.config.monitor
        if monitor not in logs:
            validated = "val_loss" in logs
            if validated or not monitor.startswith("val_"):
                raise ConfigurationError(
                    f"EarlyStopping(monitor={monitor!r}): no such key in the epoch-{epoch} logs "
                    f"(available: {', '.join(sorted(logs))}); callbacks that add keys must be "
                    "registered before EarlyStopping"
                )
            return  # an epoch without validation does not count
        value = float(logs[monitor])
        if self.improves(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            return
        self.wait += 1
        if self.wait >= self.config.patience:
            self._stop(handler, epoch)

    def _stop(self, handler: NNHandler, epoch: int) -> None:
        self.stopped_epoch = epoch
        handler.logger.info(
            "early stopping at epoch %d: %s has not improved on %.6g (epoch %s) for %d "
            "counted epoch(s)", epoch, self.config.monitor, self.best, self.best_epoch, self.wait,
        )
        handler.request_stop()

    # -- StateProvider -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.model_dump(),
            "best": self.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the progress; this instance's own configuration is kept as given."""
        self.best = float(state["best"])
        self.best_epoch = state["best_epoch"]
        self.wait = int(state["wait"])
        self.stopped_epoch = state["stopped_epoch"]
