"""Preemption and emergency checkpoints.

Every callback that is an :class:`~nnhandler.checkpointing.EmergencySaver` (the built-in one:
``AutoSaveCallback(save_on_signal=..., save_on_exception=...)``) takes part. Watched signals
(``save_on_signal=True``: SIGTERM and SIGUSR1, or the signals listed) make ``train`` install
handlers that only record the signal; the training loop asks after every
optimizer step whether to stop (so a stop never splits a gradient-accumulation group), and at
the end of an epoch's batches and after each epoch. Under DDP the ranks agree first: each step
starts a non-blocking MAX all-reduce of the local flag on a CPU (gloo) group and waits for the
previous step's, so every rank learns of a signal that reached any rank at the same step. Then
each saver that watches the signal writes an emergency checkpoint synchronously through the
checkpointing seam (``flush`` of its background write in flight, if any, then
``save_emergency``) and ``train`` returns normally with ``handler.preempted == True``.

A saver with ``saves_on_exception`` (``save_on_exception=True``): when an exception
(``KeyboardInterrupt`` too) escapes an epoch's batches or its validation, the state as of the
last completed batch is written before the exception propagates, unchanged. Single process
only: under DDP the other ranks may be anywhere, so no collective save is possible.

Emergency checkpoints are ordinary checkpoints (atomic, with their integrity record,
``on_checkpoint_saved`` fires, the saver's own bookkeeping applies) that also
record the position inside the epoch (state key ``"position"``, :mod:`.components.position`),
so a resumed ``train`` continues that epoch from its next batch.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint.storage import URL, same_location
from .checkpointing import EXCEPTION, PREEMPTED, Emergency, EmergencySaver, emergency_name
from .components.position import EpochPosition, PartialEpoch, pending_grads_of
from .distributed import PipelinedAgreement, side_group
from .errors import ConfigurationError
from .loop import (
    BACKWARD,
    BETWEEN_BATCHES,
    OPTIMIZER_STEP,
    VALIDATION,
    FailurePoint,
)

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["IgnoreInWorkers", "PreemptionGuard", "PreemptionReport", "SignalFlag",
           "emergency_name", "emergency_savers", "watched_signals"]

@dataclass(frozen=True)
class PreemptionReport:
    """What a ``train`` call that stopped on a signal did (``handler.preemption``).

    ``epoch`` is the epoch a resume continues and ``batches`` how many of its batches ran
    (``0``: training stopped after epoch ``epoch - 1``). ``paths`` are the checkpoints to
    resume from, one per emergency saver watching the signal whose save succeeded (after a
    complete epoch that the saver's schedule had just saved, that file).
    """

    signal: str
    epoch: int
    batches: int
    #: a URL (a ``str``) for a checkpoint in object storage
    paths: tuple[Path | URL, ...]


def emergency_savers(callbacks: Iterable[object]) -> list[EmergencySaver]:
    """The callbacks that write emergency checkpoints: :class:`EmergencySaver` s that watch
    a signal or save on an exception, in order."""
    return [c for c in callbacks if isinstance(c, EmergencySaver)
            and (c.emergency_signals or c.saves_on_exception)]


def watched_signals(callbacks: Iterable[object]) -> tuple[signal.Signals, ...]:
    """The signals the emergency savers among ``callbacks`` stop training on, in order, each
    once."""
    signals: list[signal.Signals] = []
    for saver in emergency_savers(callbacks):
        signals.extend(s for s in saver.emergency_signals if s not in signals)
    return tuple(signals)


class IgnoreInWorkers:
    """``worker_init_fn`` of the handler's DataLoaders while ``save_on_signal`` is on: worker
    processes ignore the stop signals — the main process decides. (A scheduler signals every
    process of a job step, and PyTorch's workers die of SIGTERM, which would end the epoch
    with an error instead of a clean stop.) Then the user's own ``worker_init_fn`` runs."""

    def __init__(self, signals: Iterable[int], then: Callable[[int], Any] | None) -> None:
        self.signals = tuple(int(number) for number in signals)
        self.then = then

    def __call__(self, worker_id: int) -> None:
        for number in self.signals:
            signal.signal(number, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


class SignalFlag:
    """Handlers for ``signals`` that only record them (the first one, and how many came).

    Installed on the main thread for one ``train`` call; the handlers that were there before
    are put back afterwards (they are not called in between). A signal that arrives while the
    stop is already requested — e.g. a second SIGTERM during the emergency save — is counted
    and otherwise ignored: nothing can be interrupted half-way, and SIGKILL still ends the
    process at once.
    """

    def __init__(self, signals: tuple[signal.Signals, ...]) -> None:
        self.signals = signals
        self.received = 0  # the first signal's number, 0 for none
        self.count = 0
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            names = ", ".join(s.name for s in self.signals)
            raise ConfigurationError(
                f"save_on_signal ({names}) needs train() on the main thread: Python delivers "
                f"signals only there, and this is {threading.current_thread().name!r}; call "
                "train from the main thread or set save_on_signal=False")
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._record)

    def restore(self) -> None:
        for number, previous in self._previous.items():
            # None: a handler installed from outside Python; the default is the closest
            signal.signal(number, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _record(self, number: int, frame: types.FrameType | None) -> None:
        # runs between two bytecodes of the main thread: only record, no I/O, no locks
        self.count += 1
        if not self.received:
            self.received = number


class _SignalStopWatch:
    """The loop's :class:`~nnhandler.loop.StopWatch` for ``save_on_signal``."""

    def __init__(self, flag: SignalFlag) -> None:
        self.flag = flag
        self.agreement: PipelinedAgreement | None = None
        self.stopped_by = 0  # the agreed signal number once the loop stops

    def at_step(self) -> bool:
        if self.agreement is None:
            self.stopped_by = self.flag.received
        else:
            self.stopped_by = self.agreement.pipelined(self.flag.received)
        return bool(self.stopped_by)

    def at_sync_point(self) -> bool:
        if self.agreement is None:
            self.stopped_by = self.flag.received
        else:
            self.stopped_by = self.agreement.settle(self.flag.received)
        return bool(self.stopped_by)


class PreemptionGuard:
    """Emergency checkpointing for one ``train`` call, from the handler's emergency savers
    (:class:`~nnhandler.checkpointing.EmergencySaver`). ``position`` is where the handler
    records a partial epoch (a stop inside an epoch)."""

    def __init__(self, handler: Trainer, savers: list[EmergencySaver],
                 position: EpochPosition) -> None:
        self.handler = handler
        self.position = position
        self.on_signal = [s for s in savers if s.emergency_signals]
        self.on_exception = [s for s in savers if s.saves_on_exception]
        signals = watched_signals(self.on_signal)
        self.flag = SignalFlag(signals)
        self.watch = _SignalStopWatch(self.flag) if signals else None

    @classmethod
    def for_train(cls, handler: Trainer, position: EpochPosition) -> PreemptionGuard | None:
        """``None`` when no callback writes emergency checkpoints. Two that would write
        theirs into one directory are a :class:`~nnhandler.ConfigurationError` (their file
        names would be the same)."""
        savers = emergency_savers(handler.callbacks)
        if not savers:
            return None
        for index, saver in enumerate(savers):
            for other in savers[:index]:
                if same_location(saver.emergency_directory, other.emergency_directory):
                    raise ConfigurationError(
                        f"{other!r} and {saver!r} would both write emergency checkpoints into "
                        f"{str(saver.emergency_directory)!r}: enable save_on_signal / "
                        "save_on_exception on one auto-saver per directory")
        return cls(handler, savers, position)

    @property
    def stop_watch(self) -> _SignalStopWatch | None:
        return self.watch

    @property
    def records_failures(self) -> bool:
        """Whether the loop should note where an exception escaped (single process only)."""
        return bool(self.on_exception) and not self.handler.distributed.enabled

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Install the signal handlers (and, under DDP, the ranks' agreement) for the call;
        the previous handlers come back however the call ends."""
        handler = self.handler
        if self.on_exception and handler.distributed.enabled and handler.distributed.is_main:
            handler.logger.warning(
                "save_on_exception has no effect under DDP (world size %d): an exception on "
                "one rank leaves the others anywhere, so no collective save is possible; "
                "save_on_signal and the scheduled auto-saves still apply",
                handler.distributed.world_size)
        if self.watch is None:
            yield
            return
        self.flag.install()
        try:
            if handler.distributed.enabled:
                self.watch.agreement = PipelinedAgreement(side_group(handler, "stop"))
            yield
        finally:
            self.flag.restore()
            self.watch.agreement = None
            if self.flag.received and not self.watch.stopped_by:
                handler.logger.warning(
                    "%s arrived after the last point where training could stop (the end of "
                    "the last epoch): train finished normally, without an emergency "
                    "checkpoint", _signal_name(self.flag.received))
            elif self.flag.count > 1:
                handler.logger.warning("%d further signal(s) arrived after the first one and "
                                       "were ignored", self.flag.count - 1)

    # -- stopping on a signal ------------------------------------------------------------------
    def after_stop(self, stopped_at: tuple[int, int]) -> PreemptionReport:
        """The loop stopped at ``(epoch, batches)``: write every emergency checkpoint (all
        ranks take part; rank 0 writes) and report."""
        assert self.watch is not None
        handler = self.handler
        epoch, batches = stopped_at
        name = _signal_name(self.watch.stopped_by)
        where = (f"after batch {batches} of epoch {epoch}" if batches
                 else f"after epoch {epoch - 1}")
        if handler.distributed.is_main:
            handler.logger.warning("%s received: training stopped %s%s; writing the emergency "
                                   "checkpoint", name, where,
                                   " (every rank at the same step)"
                                   if handler.distributed.enabled else "")
        paths = []
        for saver in self.on_signal:
            flush_error = _flush(saver, handler)
            path = saver.save_emergency(handler, Emergency(PREEMPTED, epoch, batches))
            if flush_error is not None:  # on_save_error="raise": after the emergency save
                raise flush_error
            if path is not None:
                paths.append(path)
        report = PreemptionReport(name, epoch, batches, tuple(paths))
        if handler.distributed.is_main:
            handler.logger.warning(
                "PREEMPTED by %s %s; checkpoint(s) to resume from: %s. train() returns with "
                "handler.preempted = True: exit with a non-zero status so that the job is "
                "requeued", name, where, ", ".join(map(str, paths)) or "none (the save failed)")
        return report

    # -- an exception --------------------------------------------------------------------------
    def after_exception(self, error: BaseException, failure: FailurePoint | None) -> None:
        """Write the emergency checkpoints for ``error`` if the state allows it; never raise:
        what went wrong is noted on ``error``."""
        if not self.records_failures:
            return
        handler = self.handler
        try:
            partial, exact = self._partial_epoch(failure)
        except _NoConsistentState as refusal:
            handler.logger.error("no emergency checkpoint: %s", refusal)
            error.add_note(f"nnhandler: no emergency checkpoint was written: {refusal}")
            return
        self.position.partial = partial
        for saver in self.on_exception:
            try:
                flush_error = _flush(saver, handler)
                if flush_error is not None:
                    error.add_note(f"nnhandler: the background auto-save in flight failed: "
                                   f"{type(flush_error).__name__}: {flush_error}")
                path = saver.save_emergency(
                    handler, Emergency(EXCEPTION, partial.epoch, partial.batches))
            except BaseException as failed:  # a second Ctrl-C too: never mask the original
                handler.logger.error("emergency checkpoint into %s failed: %s: %s",
                                     saver.emergency_directory, type(failed).__name__, failed)
                error.add_note(f"nnhandler: the emergency checkpoint into "
                               f"{saver.emergency_directory} failed: {type(failed).__name__}: "
                               f"{failed}")
                continue
            if path is None:
                continue
            caveat = ("" if exact else "; the failing batch had started (its random draws and "
                      "any BatchNorm statistics it updated stay in the state), so the resumed "
                      "run repeats that batch with the same data but is not bit-identical")
            handler.logger.error("emergency checkpoint %s written: epoch %d after %d batch(es)%s",
                                 path, partial.epoch, partial.batches, caveat)
            error.add_note(f"nnhandler: emergency checkpoint {path} holds the state after "
                           f"{partial.batches} batch(es) of epoch {partial.epoch}; "
                           f"NNHandler.load it to continue{caveat}")

    def _partial_epoch(self, failure: FailurePoint | None) -> tuple[PartialEpoch, bool]:
        """The consistent state where ``failure`` left training, and whether it is exactly
        that of an uninterrupted run."""
        if failure is None:
            raise _NoConsistentState(
                "the exception escaped outside an epoch's batches and validation (e.g. from "
                "on_train_begin, on_epoch_begin or on_epoch_end); the newest checkpoint stands")
        if failure.stage == OPTIMIZER_STEP:
            raise _NoConsistentState(
                f"the exception interrupted the optimizer step of batch {failure.done + 1} of "
                f"epoch {failure.epoch} (or came after it, before the batch was counted): "
                "parameters, optimizer, EMA or scheduler may be partly updated")
        handler = self.handler
        pending = _inside_group(failure)
        if failure.stage == BACKWARD:
            if pending:
                raise _NoConsistentState(
                    f"the exception came during the backward pass of batch {failure.done + 1} "
                    f"of epoch {failure.epoch}, inside a gradient-accumulation group: the "
                    "accumulated gradients are mixed with the failing batch's")
            optimizer = handler.optimizer
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)  # only the failing batch's contribution
        if failure.batch_size is None:
            raise _NoConsistentState("the training loader has no batch_size")
        if failure.torch_random_state is not None:  # validation runs again from its start
            torch.set_rng_state(failure.torch_random_state)
        partial = PartialEpoch(
            epoch=failure.epoch, batches=failure.done, batch_size=failure.batch_size,
            accumulation=failure.accumulation, metric_names=tuple(handler.metrics),
            totals=(failure.totals.export(),),
            pending_grads=pending_grads_of(handler.module) if pending else None,
            reason="exception", samples=failure.samples, batches_per_epoch=failure.batches,
            learning_rates=failure.learning_rates)
        return partial, failure.stage in (BETWEEN_BATCHES, VALIDATION)


def _flush(saver: EmergencySaver, handler: Trainer) -> Exception | None:
    """Settle ``saver``'s write in flight; the error its policy raises is returned, so the
    emergency checkpoint is written first."""
    try:
        saver.flush(handler)
    except Exception as error:
        return error
    return None


class _NoConsistentState(Exception):
    """The state at an exception cannot be saved as one a resume could continue."""


def _inside_group(failure: FailurePoint) -> bool:
    """Whether batches before the failing one left gradients waiting for an optimizer step."""
    done, accumulation, batches = failure.done, failure.accumulation, failure.batches
    if done == 0 or accumulation == 1:
        return False
    group_start = (done - 1) - (done - 1) % accumulation
    group_size = accumulation if batches is None else min(accumulation, batches - group_start)
    return done - group_start != group_size


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
