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
from rich.table import Column

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
#: the widths that keep both rows within 80 columns; the status (the last epoch's loss and
#: metrics) takes what is left and is cut with an ellipsis, never the counters
_BAR_WIDTH = 24


def _fixed(width: int) -> Column:
    """A column of the live display that keeps its width (``width`` at least)."""
    return Column(min_width=width, no_wrap=True, overflow="crop")


def _plain_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TrainingProgress:
    """Training progress on stderr.

    At a terminal: a live rich display of two rows that fits 80 columns, ``epoch 3/10`` with
    the run's elapsed time, its estimate of the time left and the last epoch's ``loss=...``,
    and ``batch 45/100`` of the running epoch with the epoch's elapsed and remaining time.
    Anywhere else (piped, a CI log, a SLURM output file): no live display, but one plain line
    per epoch, as Lightning and tqdm write in CI logs: ``epoch 3/10  100 batches  loss=0.1234
    ...  12.3 s  elapsed 0:00:37  eta 0:01:26``. ``console``: where it goes (default: a rich
    console on stderr; its ``is_terminal`` chooses between the two). Disabled, every method is
    a no-op, so the loop calls it unconditionally.
    """

    def __init__(self, enabled: bool, start_epoch: int, end_epoch: int,
                 console: Console | None = None) -> None:
        self._progress: Progress | None = None
        self._epochs: TaskID | None = None
        self._batches: TaskID | None = None
        self._unreported, self._reported_at = 0, 0.0
        self._console: Console | None = None
        self._end_epoch, self._first_epoch = end_epoch, start_epoch
        self._epoch, self._batch_count = start_epoch, 0
        self._started_at = self._epoch_started_at = time.monotonic()
        if not enabled:
            return
        console = console if console is not None else Console(stderr=True)
        if not console.is_terminal:
            self._console = console  # plain lines, one per epoch
            return
        self._progress = Progress(
            TextColumn("{task.description}", table_column=_fixed(5)),
            MofNCompleteColumn(table_column=_fixed(9)),
            BarColumn(bar_width=_BAR_WIDTH, table_column=_fixed(_BAR_WIDTH)),
            TimeElapsedColumn(table_column=_fixed(7)),
            TimeRemainingColumn(table_column=_fixed(7)),
            TextColumn("{task.fields[status]}",
                       table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
            console=console,
            transient=False,
            expand=True,
        )
        self._epochs = self._progress.add_task(
            "epoch", total=end_epoch, completed=start_epoch, status=""
        )

    def __enter__(self) -> TrainingProgress:
        if self._progress is not None:
            self._progress.start()
        self._started_at = time.monotonic()
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
        self._epoch, self._batch_count = epoch, done
        self._epoch_started_at = time.monotonic()
        if self._progress is None:
            return
        if self._batches is not None:
            self._progress.remove_task(self._batches)
        self._batches = self._progress.add_task("batch", total=batches, completed=done,
                                                status="")

    def advance_batch(self) -> None:
        # rich redraws at most ten times a second, so batches are handed over in bunches:
        # a rich update per batch (a lock and a deque) costs a tiny model several percent
        if self._progress is None:
            if self._console is not None:
                self._batch_count += 1
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
        if self._console is not None:
            self._console.print(self._epoch_line(status), markup=False, highlight=False,
                                soft_wrap=True)
            return
        self._report_batches(time.monotonic())
        if self._progress is not None and self._epochs is not None:
            self._progress.update(self._epochs, advance=1, status=status)

    def _epoch_line(self, status: str) -> str:
        """The plain line for the epoch that just ended."""
        now = time.monotonic()
        elapsed = now - self._started_at
        done = self._epoch - self._first_epoch
        left = self._end_epoch - self._epoch
        eta = _plain_duration(elapsed / done * left) if done > 0 else "?"
        batches = f"{self._batch_count} batch" + ("" if self._batch_count == 1 else "es")
        parts = [f"epoch {self._epoch}/{self._end_epoch}", batches, status,
                 f"{now - self._epoch_started_at:.1f} s", f"elapsed {_plain_duration(elapsed)}",
                 f"eta {eta}"]
        return "  ".join(part for part in parts if part)
