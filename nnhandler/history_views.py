"""The read-only views of the training history and progress that :class:`~nnhandler.NNHandler`
offers (``handler.train_losses``, ``handler.epoch`` …): names of the original NNHandler, read
from the handler's :class:`~nnhandler.components.History` and
:class:`~nnhandler.components.Progress` components, which checkpoints save and restore."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

from .components import History, Progress

if TYPE_CHECKING:
    from .handler import NNHandler

__all__ = ["HistoryViews"]


class HistoryViews:
    """Mixed into :class:`~nnhandler.NNHandler`; reads only ``history_state`` and ``progress``
    (the plots hand the handler to :mod:`nnhandler.plotting`)."""

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

    def plot_losses(self, path: str | os.PathLike[str] | None = None, *,
                    log_y_scale: bool = False, show: bool = False) -> Any:
        """Plot training and validation loss per epoch (needs ``nnhandler[plot]``): a PNG at
        ``path`` (returns the path), else the matplotlib ``Figure`` (a notebook displays it);
        ``show=True`` also shows it through pyplot. The original NNHandler's
        ``plot_losses(True)`` (its ``log_y_scale``) is taken, with a ``DeprecationWarning``."""
        from .plotting import plot_losses

        return plot_losses(self._plotted(), path, log_y_scale=log_y_scale, show=show)

    def plot_metrics(self, path: str | os.PathLike[str] | None = None,
                     names: Iterable[str] | None = None, *, log_y_scale: bool = False,
                     show: bool = False) -> Any:
        """Plot each metric (training and validation) per epoch, one panel per metric
        (``names`` selects some); the rest as :meth:`plot_losses`."""
        from .plotting import plot_metrics

        return plot_metrics(self._plotted(), path, None if names is None else list(names),
                            log_y_scale=log_y_scale, show=show)

    def _plotted(self) -> NNHandler:
        return cast("NNHandler", self)  # HistoryViews is mixed into NNHandler only
