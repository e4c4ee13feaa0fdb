"""When an auto-saver saves: by epochs (``interval``), by optimizer steps (``every_n_steps``)
and by training time (``every_seconds``), in one place.

:class:`SaveSchedule` answers "save now?" at an epoch's end and after an optimizer step, owns
the time accounting and carries it in the auto-saver's state. The rules:

* ``interval`` keeps its epoch meaning (every N-th absolute epoch, or ``-1``: the last epoch
  of each ``train`` call).
* ``every_n_steps=S``: after every optimizer step (after gradient accumulation) whose absolute
  number, counted across resumes, is a multiple of S. Deterministic: every rank decides the
  same step without communicating.
* ``every_seconds=T``: once T seconds of training time have passed since this callback's
  last scheduled save. Training time is the wall-clock time inside ``train`` calls,
  validation and saving included; the time between ``train`` calls (and before the first) is
  not counted. The elapsed time is part of the callback's state, so it carries across a
  resume: a job restarted every 20 minutes with ``every_seconds=1800`` still saves every 30
  minutes of training. Every scheduled save restarts the clock (one that failed too, so a
  failing disk is tried again T seconds later, not at every step); emergency checkpoints do
  not (they are not part of the schedule, and carry the elapsed time to the resumed run).
  Under DDP rank 0's clock decides and the ranks agree through a pipelined all-reduce on a
  gloo group of their own (:class:`~nnhandler.distributed.PipelinedAgreement`): a check
  starts a non-blocking reduction and reads the previous check's, so every rank saves at the
  same step and no step waits for the network. Checks are not made at every step: the value
  rank 0 sends also carries the cadence, the number of steps to the next check, chosen from
  its measured step time so that checks come about every T/100 seconds, 0.1 s at least
  (every step for slow steps, every few thousand for a tiny model). A save thus comes within
  about 2 % of T late; an epoch's end settles it with one blocking reduction. (Checking at
  every step cost a 2-rank gloo run of a tiny model on 2 cores ~0.45 ms a step, ~18 %.)
* Any combination may be set; a save happens when any fires, never twice for the same step.
  A step or time trigger that fires at an epoch's last optimizer step is deferred to that
  epoch's end, so that save is one end-of-epoch checkpoint with the epoch's complete logs
  (``val_*`` included), exactly the file ``interval`` would write there. (A loader without a
  length has no known last batch: there a step save at the last batch and an ``interval``
  save at the epoch's end are two files of the same step.)

The clock is injectable (``clock=``, :func:`time.monotonic` by default) so tests drive time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ..distributed import PipelinedAgreement, side_group

if TYPE_CHECKING:
    from ..config import AutoSaveConfig
    from ..trainer import Trainer

__all__ = ["SaveSchedule", "WriteWaits"]

#: the purpose of the ranks' gloo group for the time trigger (see side_group)
TIME_GROUP: Final = "autosave-time"
#: DDP: the time trigger's checks come about every_seconds / 100 apart, at least this many
#: seconds (a check is a small all-reduce whose threads compete with training for the CPU)
MIN_CHECK_GAP: Final = 0.1


@dataclass
class WriteWaits:
    """Saves of one ``train`` call that found the previous background write still running
    and waited for it (``async_save``: at most one write in flight, no save skipped)."""

    count: int = 0
    seconds: float = 0.0
    longest: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds
        self.longest = max(self.longest, seconds)

    def report(self, logger: logging.Logger, where: str) -> None:
        """One line for the call (nothing when no save waited): a warning once the waits add
        up to a second or more, else at info level."""
        if self.count:
            logger.log(logging.WARNING if self.seconds >= 1.0 else logging.INFO,
                "async_save: %d save(s) into %s waited for the previous background write "
                "(%.2f s in all, longest %.2f s): saves come faster than the disk writes them; "
                "a larger every_n_steps/every_seconds/interval avoids the wait", self.count,
                where, self.seconds, self.longest)


class SaveSchedule:
    """The schedule of one auto-saver (see the module docstring). Every rank keeps one; under
    DDP only rank 0's clock counts, and its elapsed time is the one checkpoints record."""

    __slots__ = ("_agreement", "_carried", "_checked", "_deferred", "_every_n_steps",
                 "_every_seconds", "_interval", "_mark", "_next_check", "_now", "clock",
                 "epoch_batches", "saved_at", "waits")

    def __init__(self, config: AutoSaveConfig, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.clock = clock
        self._interval = config.interval
        self._every_n_steps = config.every_n_steps
        self._every_seconds = config.every_seconds
        #: training seconds since the last scheduled save, up to ``_mark``
        self._carried = 0.0
        #: the clock when the running ``train`` call's accounting started (``None`` outside)
        self._mark: float | None = None
        #: the clock at the last decision point (train begin/end, a step with
        #: ``every_seconds``, an epoch's end): time is read there only, so a checkpoint's
        #: record is the elapsed time of its decision (exactly 0 for a scheduled save)
        self._now = 0.0
        self._agreement: PipelinedAgreement | None = None
        #: DDP: the step of the next agreement on the time trigger, and (step, clock) of the
        #: last one (rank 0 measures its step time from it)
        self._next_check = 0
        self._checked = (0, 0.0)
        #: a step or time trigger fired at the epoch's last step: save at its end
        self._deferred = False
        #: batches of the epoch in progress (from the step events), for ``{batch}`` at its end
        self.epoch_batches: int | None = None
        #: ``(step, epoch, batches, path)`` of the last save inside an epoch (this process)
        self.saved_at: tuple[int, int, int, str] | None = None
        self.waits = WriteWaits()

    def configure(self, config: AutoSaveConfig) -> None:
        """Follow a reconfiguration (the elapsed time is kept)."""
        self._interval = config.interval
        self._every_n_steps = config.every_n_steps
        self._every_seconds = config.every_seconds

    # -- a train call --------------------------------------------------------------------------
    def begin_call(self, handler: Trainer) -> None:
        """``train`` starts: the clock runs; under DDP the ranks' agreement on the time
        trigger is set up (a collective: every rank's ``on_train_begin``)."""
        self._mark = self._now = self.clock()
        self._deferred = False
        self._next_check, self._checked = 0, (0, self._now)
        self.saved_at = None
        self.waits = WriteWaits()
        if self._every_seconds is not None and handler.distributed.enabled:
            self._agreement = PipelinedAgreement(side_group(handler, TIME_GROUP))

    def end_call(self) -> None:
        """``train`` ends: the time until now counts, the time until the next call does not;
        the reduction in flight is waited for (every rank's ``on_train_end``)."""
        self._now = self.clock()
        self._carried = self.elapsed()
        self._mark = None
        if self._agreement is not None:
            self._agreement.drain()
            self._agreement = None

    def abandon_call(self) -> None:
        """``train`` fails: the time until now counts; the agreement is dropped without a
        collective (under DDP the other ranks may be anywhere)."""
        self._now = self.clock()
        self._carried = self.elapsed()
        self._mark = self._agreement = None

    def elapsed(self) -> float:
        """Training seconds since the last scheduled save, as of the last decision point."""
        if self._mark is None:
            return self._carried
        return self._carried + (self._now - self._mark)

    def restart_clock(self) -> None:
        """A scheduled save happens now (before its state is collected, so the file records
        0): the time trigger counts from here; an agreement in flight is dropped (it carried
        the flag this save answers)."""
        self._carried = 0.0
        self._mark = None if self._mark is None else self._now
        self._deferred = False
        if self._agreement is not None:
            self._agreement.drain()
            self._next_check = 0

    # -- decisions -----------------------------------------------------------------------------
    def _time_flag(self, is_main: bool) -> int:
        """Rank 0's vote that the time trigger is due (read at this decision point)."""
        every = self._every_seconds
        if every is None:
            return 0
        self._now = self.clock()
        return int(is_main and self.elapsed() >= every)

    def at_step(self, step: int, last_of_epoch: bool, is_main: bool) -> bool:
        """After optimizer step ``step`` (absolute): save now? Every rank calls it at every
        step (the time trigger's agreement is a collective). At the epoch's last step a due
        save is deferred to the epoch's end (see :meth:`at_epoch_end`)."""
        n = self._every_n_steps
        due = n is not None and step % n == 0
        if self._every_seconds is not None:
            if self._agreement is None:
                due = due or bool(self._time_flag(is_main))
            elif step >= self._next_check:
                due = self._agreed_time(step, is_main) or due
        if due and last_of_epoch:
            self._deferred = True
            return False
        return due

    def _agreed_time(self, step: int, is_main: bool) -> bool:
        """A check under DDP (every rank at the same step): rank 0 sends its vote and the
        cadence, ``2 * steps_to_next_check + vote``; every rank takes the previous check's."""
        assert self._agreement is not None and self._every_seconds is not None
        vote = self._time_flag(is_main)
        last_step, last_time = self._checked
        seconds = (self._now - last_time) / max(step - last_step, 1)
        gap = max(self._every_seconds / 100, MIN_CHECK_GAP)
        cadence = 1 if seconds <= 0 else int(gap / seconds)
        self._checked = (step, self._now)
        answer = self._agreement.exchange(
            2 * min(max(cadence, 1), 10_000) + vote if is_main else 0)
        self._next_check = step + max(answer // 2, 1)
        return bool(answer & 1)

    def at_epoch_end(self, epoch: int, *, last_of_call: bool, is_main: bool) -> bool:
        """At the end of epoch ``epoch`` (absolute, 1-based): save now? ``interval``, a step or
        time trigger deferred from the epoch's last step, or the time trigger (agreed by a
        blocking reduction under DDP: every rank calls this at every epoch end)."""
        due, self._deferred = self._deferred, False
        self._now = self.clock()
        interval = self._interval
        if interval:
            due = due or (last_of_call if interval == -1 else epoch % interval == 0)
        if self._every_seconds is not None:
            flag = self._time_flag(is_main)
            if self._agreement is not None:
                in_flight = self._agreement.drain()  # the last check's, unanswered
                flag = (in_flight & 1) | self._agreement.settle(flag)
                self._next_check = 0
            due = due or bool(flag)
        return due

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The elapsed training time; ``0.0`` without ``every_seconds`` (nothing measures it
        then, and checkpoints of runs without a time trigger stay free of wall-clock values:
        bit-identical for identical runs)."""
        return {"elapsed_seconds": self.elapsed() if self._every_seconds is not None else 0.0}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Take the elapsed time a checkpoint recorded (validated by
        :class:`~.autosave_state.ScheduleStateRecord` first; ``None``: a file from before step
        and time triggers, which counts from 0)."""
        self._carried = 0.0 if state is None else float(state["elapsed_seconds"])
        if self._mark is not None:
            self._mark = self._now
