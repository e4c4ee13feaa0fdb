"""``CSVLogger``: one CSV row per epoch, kept consistent with the run across resumes."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..checkpoint.writer import atomic_write
from ..components.history import is_plain
from ..errors import ConfigurationError
from .base import Callback

if TYPE_CHECKING:
    from ..handler import NNHandler

__all__ = ["CSVLogger"]

Row = Mapping[str, Any]


class CSVLogger(Callback):
    """Write the epoch logs to a CSV file, one row per epoch (rank 0 only under DDP).

    The header holds the keys in the order they first appeared (``epoch``, ``loss``, metrics,
    ``val_*``, keys of callbacks registered *before* this one). A key that first appears later
    (say ``val_loss`` on the first validating epoch) extends the header: the file is rewritten
    atomically with the new column, earlier rows left empty there. Each row is flushed as it is
    written.

    When ``train`` starts, the file is made to match the run being continued: rows of epochs
    beyond the current one (written by a run that crashed after its last checkpoint) are
    removed, and rows the file lacks for epochs up to the current one (a crash between the
    checkpoint and the row) are filled in from ``handler.history``. So after a resume the file
    holds exactly one row per epoch, and a fresh run (epoch 0) starts the file anew. A file that
    exists but has no ``epoch`` column is not one of ours: that is a
    :class:`~nnhandler.ConfigurationError`, and it is left untouched.

    A :class:`~nnhandler.StateProvider` (``state_key`` ``"csv_logger:<path>"``): the header and
    the last epoch written are in every checkpoint.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"CSVLogger path must be a str or path, got {path!r}")
        self.path = Path(path)
        if self.path.is_dir():
            raise ConfigurationError(f"CSVLogger path {str(self.path)!r} is a directory")
        self.fieldnames: list[str] = []
        self.last_epoch = 0
        self._file: IO[str] | None = None

    @property
    def state_key(self) -> str:
        return f"csv_logger:{Path(os.path.normpath(self.path)).as_posix()}"

    def __repr__(self) -> str:
        return f"CSVLogger({str(self.path)!r})"

    # -- hooks ---------------------------------------------------------------------------------
    def on_train_begin(self, handler: NNHandler, start_epoch: int, **kwargs: Any) -> None:
        if handler.distributed.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._reconcile(handler.history, start_epoch)
            self._file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115

    def on_epoch_end(
        self, handler: NNHandler, epoch: int, logs: dict[str, Any], **kwargs: Any
    ) -> None:
        if not handler.distributed.is_main:
            return
        row = {key: value for key, value in logs.items() if is_plain(value)}
        new_keys = [key for key in row if key not in self.fieldnames]
        if new_keys or self._file is None:
            self.fieldnames += new_keys
            _, rows = self._read()
            self._close()
            self._rewrite([*rows, row])
            self._file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        else:
            self._writer(self._file).writerow(row)
            self._file.flush()
        self.last_epoch = epoch

    def on_train_end(self, **kwargs: Any) -> None:
        self._close()

    def on_exception(self, **kwargs: Any) -> None:
        self._close()

    # -- the file ------------------------------------------------------------------------------
    def _writer(self, file: IO[str]) -> csv.DictWriter[str]:
        return csv.DictWriter(file, fieldnames=self.fieldnames, restval="")

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        """The file's header and rows (empty when it does not exist or is empty)."""
        try:
            with open(self.path, newline="", encoding="utf-8") as file:
                reader = csv.DictReader(file)
                rows = list(reader)
                header = list(reader.fieldnames or [])
        except FileNotFoundError:
            return [], []
        if header and "epoch" not in header:
            raise ConfigurationError(
                f"CSVLogger: {str(self.path)!r} exists and has no 'epoch' column, so it was not "
                "written by a CSVLogger; choose another path (the file is left untouched)"
            )
        return header, rows

    def _rewrite(self, rows: Iterable[Row]) -> None:
        def write(binary: IO[bytes]) -> None:
            text = io.TextIOWrapper(binary, encoding="utf-8", newline="")
            writer = self._writer(text)
            writer.writeheader()
            writer.writerows({k: v for k, v in row.items() if k in self.fieldnames}
                             for row in rows)
            text.flush()
            text.detach()  # atomic_write flushes, fsyncs and closes the binary file

        atomic_write(self.path, write)

    def _reconcile(self, history: list[dict[str, Any]], start_epoch: int) -> None:
        """Keep rows of epochs ``<= start_epoch``, fill missing ones from ``history``."""
        header, rows = self._read()
        by_epoch: dict[int, Row] = {}
        for line, row in enumerate(rows, start=2):
            try:
                epoch = int(row["epoch"])
            except (TypeError, ValueError):
                raise ConfigurationError(f"CSVLogger: {str(self.path)!r} line {line}: epoch "
                                         f"{row['epoch']!r} is not an integer") from None
            if epoch <= start_epoch:
                by_epoch[epoch] = row
        kept = len(by_epoch)
        for entry in history:
            epoch = int(entry["epoch"])
            if epoch <= start_epoch and epoch not in by_epoch:
                by_epoch[epoch] = entry
        fieldnames = list(dict.fromkeys(
            [*header, *self.fieldnames, *(k for row in by_epoch.values() for k in row)]))
        self.fieldnames = fieldnames
        self.last_epoch = max(by_epoch, default=0)
        unchanged = kept == len(rows) == len(by_epoch) and fieldnames == header
        if (self.path.exists() and not unchanged) or (by_epoch and not self.path.exists()):
            self._rewrite(by_epoch[epoch] for epoch in sorted(by_epoch))

    # -- StateProvider -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "fieldnames": list(self.fieldnames),
                "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the header and progress; this instance's own ``path`` is kept as given."""
        self.fieldnames = [str(name) for name in state["fieldnames"]]
        self.last_epoch = int(state["last_epoch"])
