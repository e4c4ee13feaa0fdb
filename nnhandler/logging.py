"""Console (rich) and file logging, and the rich progress bar over epochs and batches."""

from __future__ import annotations

import enum
import itertools
import logging
import os
import time
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["LoggingMode", "TrainingProgress", "make_logger"]

_instance_counter = itertools.count()


class LoggingMode(enum.Enum):
    """Where a handler logs: the console (rich), a file, or both."""

    CONSOLE = "console"
    FILE = "file"
    BOTH = "both"


def make_logger(
    mode: LoggingMode | str, log_file: str | os.PathLike[str], is_main: bool
) -> logging.Logger:
    """A logger of its own for one handler (child of ``"nnhandler"``, so it propagates).

    Ranks other than 0 log warnings and errors only.
    """
    try:
        mode = LoggingMode(mode.value if isinstance(mode, LoggingMode) else mode)
    except ValueError:
        choices = ", ".join(m.name for m in LoggingMode)
        raise ValueError(f"logger_mode={mode!r} is not one of {choices}") from None
    logger = logging.getLogger(f"nnhandler.handler{next(_instance_counter)}")
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    if mode in (LoggingMode.CONSOLE, LoggingMode.BOTH):
        logger.addHandler(RichHandler(show_path=False, rich_tracebacks=False, markup=False))
    if mode in (LoggingMode.FILE, LoggingMode.BOTH):
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        logger.addHandler(file_handler)
    return logger


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


_BAR_UPDATE_S = 0.1


class TrainingProgress:
    """A rich progress bar with an epoch row and a (transient per epoch) batch row.

    Disabled, every method is a no-op, so the loop calls it unconditionally.
    """

    def __init__(self, enabled: bool, start_epoch: int, end_epoch: int) -> None:
        self._progress: Progress | None = None
        self._epochs: TaskID | None = None
        self._batches: TaskID | None = None
        self._unreported, self._reported_at = 0, 0.0
        if enabled:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._epochs = self._progress.add_task(
                "epochs", total=end_epoch, completed=start_epoch, status=""
            )

    def __enter__(self) -> TrainingProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start_epoch(self, epoch: int, batches: int | None, done: int = 0) -> None:
        """A new batch row; ``done`` batches of the epoch ran before (a continued epoch)."""
        if self._progress is None:
            return
        if self._batches is not None:
            self._progress.remove_task(self._batches)
        self._batches = self._progress.add_task(f"epoch {epoch}", total=batches,
                                                completed=done, status="")

    def advance_batch(self) -> None:
        # rich redraws at most ten times a second, so batches are handed over in bunches:
        # a rich update per batch (a lock and a deque) costs a tiny model several percent
        if self._progress is None:
            return
        self._unreported += 1
        now = time.monotonic()
        if now - self._reported_at >= _BAR_UPDATE_S:
            self._report_batches(now)

    def _report_batches(self, now: float) -> None:
        if self._progress is not None and self._batches is not None and self._unreported:
            self._progress.advance(self._batches, self._unreported)
        self._unreported, self._reported_at = 0, now

    def end_epoch(self, status: str) -> None:
        self._report_batches(time.monotonic())
        if self._progress is not None and self._epochs is not None:
            self._progress.update(self._epochs, advance=1, status=status)
