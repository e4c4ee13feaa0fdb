"""``TensorBoardLogger``: epoch logs as TensorBoard scalars (the optional extra ``tensorboard``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from ..optional import require
from .base import Callback

if TYPE_CHECKING:
    from ..handler import NNHandler

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger(Callback):
    """Write every numeric epoch-log value as a TensorBoard scalar (rank 0 only under DDP).

    The tag is the log key (``loss``, ``val_loss``, ``lr`` …) and the step is the absolute epoch;
    events are flushed after every epoch. Needs ``pip install nnhandler[tensorboard]``: without
    it, constructing the logger raises :class:`~nnhandler.MissingDependencyError` (an
    ``ImportError``) naming that command.

    After a resume, the writer is opened with ``purge_step`` = the first new epoch, so
    TensorBoard hides the events a crashed run wrote after its last checkpoint and each epoch
    shows once. Register it after callbacks whose log keys it should record.

    A :class:`~nnhandler.StateProvider` (``state_key`` ``"tensorboard:<log_dir>"``) recording
    the last epoch written.
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        self._tensorboard = require("torch.utils.tensorboard", extra="tensorboard",
                                    feature="TensorBoardLogger")
        if not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"TensorBoardLogger log_dir must be a str or path, got {log_dir!r}")
        self.log_dir = Path(log_dir)
        if self.log_dir.exists() and not self.log_dir.is_dir():
            raise ConfigurationError(f"TensorBoardLogger log_dir {str(self.log_dir)!r} exists "
                                     "and is not a directory")
        self.last_epoch = 0
        self._writer: Any = None

    @property
    def state_key(self) -> str:
        return f"tensorboard:{Path(os.path.normpath(self.log_dir)).as_posix()}"

    def __repr__(self) -> str:
        return f"TensorBoardLogger({str(self.log_dir)!r})"

    def on_train_begin(self, handler: NNHandler, start_epoch: int, **kwargs: Any) -> None:
        if handler.distributed.is_main:
            self._close()
            purge = start_epoch + 1 if start_epoch > 0 else None
            self._writer = self._tensorboard.SummaryWriter(str(self.log_dir), purge_step=purge)

    def on_epoch_end(
        self, handler: NNHandler, epoch: int, logs: dict[str, Any], **kwargs: Any
    ) -> None:
        if self._writer is None:
            return  # not rank 0
        for key, value in logs.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, float(value), global_step=epoch)
        self._writer.flush()
        self.last_epoch = epoch

    def on_train_end(self, **kwargs: Any) -> None:
        self._close()

    def on_exception(self, **kwargs: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def state_dict(self) -> dict[str, Any]:
        return {"log_dir": str(self.log_dir), "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the progress; this instance's own ``log_dir`` is kept as given."""
        self.last_epoch = int(state["last_epoch"])

