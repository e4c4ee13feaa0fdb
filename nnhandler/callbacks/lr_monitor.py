"""``LearningRateMonitor``: the learning rate of each parameter group in the epoch logs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from .base import Callback

if TYPE_CHECKING:
    from ..handler import NNHandler

__all__ = ["LearningRateMonitor"]


def lr_log_names(groups: int) -> list[str]:
    """``["lr"]`` for one parameter group, ``["lr_group0", "lr_group1", …]`` for several."""
    return ["lr"] if groups == 1 else [f"lr_group{i}" for i in range(groups)]


class LearningRateMonitor(Callback):
    """Add the learning rate each parameter group trained the epoch with to the epoch logs.

    One parameter group gives the key ``lr``; several give ``lr_group0``, ``lr_group1`` … The
    value is the rate at the start of the epoch (the one the epoch trained with; a per-epoch
    scheduler steps at its end — with ``set_scheduler(..., interval="step")`` the rate changes
    within the epoch and this is its first value). The keys reach the history
    (``handler.history``), every checkpoint's ``meta["logs"]``, auto-save name templates
    (``"ep{epoch:03d}_lr{lr:.1e}"``) and loggers registered *after* this callback.

    A :class:`~nnhandler.StateProvider` (``state_key`` ``"lr_monitor"``) holding the last logged
    rates and those of the epoch in progress, so they survive a resume — also one that continues
    an epoch from an emergency checkpoint (the epoch keeps the rates it started with).
    """

    state_key = "lr_monitor"

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self._epoch_rates: dict[str, float] = {}

    def current_rates(self, handler: NNHandler) -> dict[str, float]:
        """``{log key: learning rate}`` of the handler's optimizer now."""
        optimizer = handler.optimizer
        if optimizer is None:
            raise ConfigurationError("LearningRateMonitor: the handler has no optimizer")
        groups = optimizer.param_groups
        missing = [i for i, group in enumerate(groups) if "lr" not in group]
        if missing:
            raise ConfigurationError(f"LearningRateMonitor: parameter group(s) {missing} of "
                                     f"{type(optimizer).__qualname__} have no 'lr'")
        return {name: float(group["lr"])
                for name, group in zip(lr_log_names(len(groups)), groups, strict=True)}

    def on_epoch_begin(self, handler: NNHandler, **kwargs: Any) -> None:
        if handler.resumed_mid_epoch and self._epoch_rates:
            return  # the epoch started before the interruption, with the restored rates
        self._epoch_rates = self.current_rates(handler)

    def on_epoch_end(self, logs: dict[str, Any], **kwargs: Any) -> None:
        logs.update(self._epoch_rates)
        self.last = dict(self._epoch_rates)

    # -- StateProvider -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self.last), "epoch": dict(self._epoch_rates)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last = {str(k): float(v) for k, v in state["last"].items()}
        self._epoch_rates = {str(k): float(v) for k, v in state.get("epoch", {}).items()}
