"""``AutoSaveCallback``: writes the complete training state every N epochs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import AutoSaveConfig
from ..naming import MISSING_VALUE, render_name
from .base import Callback

if TYPE_CHECKING:
    from ..handler import NNHandler

__all__ = ["AUTOSAVE_KEY_PREFIX", "AutoSaveCallback"]

AUTOSAVE_KEY_PREFIX = "autosave:"


class AutoSaveCallback(Callback):
    """Save the complete training state (a checkpoint) after selected epochs.

    Args:
        interval: ``None`` or ``0``: off. ``N > 0``: after every epoch whose absolute 1-based
            number is a multiple of N (counted across resumes). ``-1``: after the last epoch of
            each ``train`` call (also when the call stops early). Anything else, including
            ``"5"``, ``2.0`` and ``True``, is a validation error.
        save_path: directory for the files; rank 0 creates it (with parents) at the first save.
            An existing path that is not a directory is a ``ValueError``.
        name: ``str.format`` template filled with the epoch-end logs (``epoch``, ``loss``,
            ``val_loss``, each metric and ``val_<metric>``, and keys added by callbacks);
            ``.pth`` is appended unless present. A key missing at save time is written as
            ``NA`` and a warning is logged: the checkpoint is saved anyway. Directory parts
            and ``..`` are rejected; formatted values are sanitised to stay in ``save_path``.
        overwrite: keep only the latest auto-save. The new file is completely written before
            the previous one is removed; with a fixed name the new file atomically replaces the
            old one.

    The callback is a :class:`~nnhandler.StateProvider`: its configuration and bookkeeping
    (which file it wrote last) go into every checkpoint, so a resumed handler keeps saving by
    the same rules and ``overwrite`` removes the file its own lineage wrote. Its ``state_key``
    is derived from ``save_path`` and ``name``; two callbacks writing the same files are a
    :class:`~nnhandler.DuplicateStateKeyError`. Under DDP every rank runs it; rank 0 writes while
    the others wait, and an error on rank 0 is raised on every rank.
    """

    is_checkpoint_writer = True

    def __init__(
        self,
        interval: int | None,
        save_path: str | os.PathLike[str] = ".",
        name: str = "model_epoch{epoch:02d}",
        overwrite: bool = False,
    ) -> None:
        self.config = AutoSaveConfig(
            interval=interval, save_path=Path(save_path), name=name, overwrite=overwrite
        )
        self.last_saved_path: str | None = None
        self.last_saved_epoch: int | None = None
        self.save_count = 0
        self._call_start_epoch = 0
        self._call_end_epoch = 0

    # -- configuration -------------------------------------------------------------------------
    @staticmethod
    def key_for(config: AutoSaveConfig) -> str:
        directory = Path(os.path.normpath(config.save_path)).as_posix()
        return f"{AUTOSAVE_KEY_PREFIX}{directory}/{config.name}"

    @property
    def state_key(self) -> str:
        return self.key_for(self.config)

    def reconfigure(self, config: AutoSaveConfig) -> None:
        """Apply a new configuration, keeping the bookkeeping of this instance's lineage."""
        self.config = config

    def __repr__(self) -> str:
        c = self.config
        return (
            f"AutoSaveCallback(interval={c.interval!r}, save_path={str(c.save_path)!r}, "
            f"name={c.name!r}, overwrite={c.overwrite!r})"
        )

    # -- schedule ------------------------------------------------------------------------------
    def should_save(self, epoch: int, *, last_of_call: bool) -> bool:
        """Whether the epoch with absolute 1-based number ``epoch`` is saved."""
        interval = self.config.interval
        if not interval:
            return False
        if interval == -1:
            return last_of_call
        return epoch % interval == 0

    # -- hooks ---------------------------------------------------------------------------------
    def on_train_begin(
        self, handler: NNHandler, start_epoch: int, end_epoch: int, **kwargs: Any
    ) -> None:
        self._call_start_epoch = start_epoch
        self._call_end_epoch = end_epoch

    def on_epoch_end(
        self, handler: NNHandler, epoch: int, logs: dict[str, Any], **kwargs: Any
    ) -> None:
        last_of_call = epoch >= self._call_end_epoch or handler.stop_requested
        if self.should_save(epoch, last_of_call=last_of_call):
            self.save_now(handler, epoch, logs)

    def on_train_end(self, handler: NNHandler, logs: dict[str, Any], **kwargs: Any) -> None:
        # interval=-1 when the call ended before its planned last epoch by another route
        ran_epochs = handler.epoch > self._call_start_epoch
        if (
            self.config.interval == -1
            and ran_epochs
            and self.last_saved_epoch != handler.epoch
        ):
            self.save_now(handler, handler.epoch, logs)

    # -- saving --------------------------------------------------------------------------------
    def path_for(self, logs: dict[str, Any]) -> tuple[Path, tuple[str, ...]]:
        """Where the checkpoint for ``logs`` goes, and the template keys missing from them."""
        file_name, missing = render_name(self.config.name, logs)
        return self.config.save_path / file_name, missing

    def save_now(self, handler: NNHandler, epoch: int, logs: dict[str, Any]) -> Path:
        """Write a checkpoint for ``epoch`` now, then apply the ``overwrite`` rule."""
        path, missing = self.path_for({**logs, "epoch": epoch})
        if missing:
            handler.logger.warning(
                "auto-save name template %r: key(s) %s missing from the epoch-%d logs "
                "(available: %s); saving as %s with %s in their place",
                self.config.name, ", ".join(missing), epoch, ", ".join(sorted(logs)),
                path.name, MISSING_VALUE,
            )
        previous = self.last_saved_path, self.last_saved_epoch, self.save_count
        # bookkeeping first, so the file records itself as this lineage's latest save
        self.last_saved_path, self.last_saved_epoch = str(path), epoch
        self.save_count += 1
        try:
            handler.save(path, logs=logs)
        except BaseException:
            self.last_saved_path, self.last_saved_epoch, self.save_count = previous
            raise
        if self.config.overwrite and previous[0] is not None:
            self._remove_previous(handler, Path(previous[0]), path)
        return path

    def _remove_previous(self, handler: NNHandler, previous: Path, new: Path) -> None:
        if not handler.distributed.is_main or previous.resolve() == new.resolve():
            return
        try:
            previous.unlink(missing_ok=True)
        except OSError as error:
            handler.logger.warning("overwrite: could not remove previous auto-save %s: %s",
                                   previous, error)

    # -- StateProvider -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_state(),
            "last_saved_path": self.last_saved_path,
            "last_saved_epoch": self.last_saved_epoch,
            "save_count": self.save_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the bookkeeping; the configuration of this instance is kept as given."""
        self.last_saved_path = state["last_saved_path"]
        self.last_saved_epoch = state["last_saved_epoch"]
        self.save_count = int(state["save_count"])
