"""The read-only views of the training history and progress that :class:`~nnhandler.NNHandler`
offers (``handler.train_losses``, ``handler.epoch`` …): names of the original NNHandler, read
from the handler's :class:`~nnhandler.components.History` and
:class:`~nnhandler.components.Progress` components, which checkpoints save and restore."""

from __future__ import annotations

from typing import Any

from .components import History, Progress

__all__ = ["HistoryViews"]


class HistoryViews:
    """Mixed into :class:`~nnhandler.NNHandler`; reads only ``history_state`` and ``progress``."""

    history_state: History
    progress: Progress

    @property
    def train_losses(self) -> list[float]:
        """The mean training loss of every epoch, oldest first."""
        return self.history_state.train_losses

    @property
    def val_losses(self) -> list[float]:
        """The mean validation loss, one entry per epoch that validated."""
        return self.history_state.val_losses

    @property
    def train_metrics_history(self) -> dict[str, list[float]]:
        """Each metric's per-epoch mean on the training data, by metric name."""
        return self.history_state.train_metrics

    @property
    def val_metrics_history(self) -> dict[str, list[float]]:
        """Each metric's per-epoch mean on the validation data (epochs that validated)."""
        return self.history_state.val_metrics

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every epoch's log dict (with its ``epoch`` number), oldest first."""
        return self.history_state.epoch_logs

    @property
    def epoch(self) -> int:
        """Number of completed epochs (absolute, across resumes)."""
        return self.progress.epoch

    @property
    def global_step(self) -> int:
        """Number of optimizer steps taken (absolute, across resumes)."""
        return self.progress.step
