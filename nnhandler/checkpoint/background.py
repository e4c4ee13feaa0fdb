"""Writing snapshots in the background: one write in flight, waited for on demand and at exit.

A :class:`BackgroundWriter` owns :class:`~.snapshot.StagingBuffers` and writes each
:class:`~.snapshot.Snapshot` in its own (non-daemon) thread with :func:`~.envelope.write_envelope`
and the writer the snapshot was taken for (:mod:`.io`) — pickling, checksums, temp file, fsync,
rename and directory fsync, exactly as a synchronous save. The caller takes the next snapshot
only after :meth:`BackgroundWriter.wait` (the staging memory is reused), so at most one write
is in flight. On Linux the writer thread runs at the
lowest CPU priority (nice 19), so that on a busy machine training keeps the CPU and the write
takes the time left over.

Nothing is lost at interpreter exit: Python joins non-daemon threads before it runs ``atexit``
hooks, so a write in flight completes (even when its writer object is gone), and a hook then
reports every write whose outcome nobody collected — a failure is logged as an error (logger
``nnhandler``) and printed to stderr.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from .envelope import write_envelope
from .snapshot import Snapshot, StagingBuffers

if TYPE_CHECKING:
    from .storage import URL, Store

__all__ = ["BackgroundWriter", "WriteOutcome"]

_LOGGER: Final = logging.getLogger("nnhandler")
#: the nice value of writer threads (Linux): the lowest priority
WRITER_NICE: Final = 19
#: submitted jobs whose outcome nobody has collected yet (reported at interpreter exit)
_UNCOLLECTED: Final[set[_Job]] = set()
_UNCOLLECTED_LOCK: Final = threading.Lock()


@dataclass
class WriteOutcome:
    """What a background write did: the file's size and the seconds it took, or its error."""

    path: Path | URL
    epoch: int
    size: int = 0
    seconds: float = 0.0
    error: BaseException | None = None


def _yield_cpu_to_training() -> None:
    """Lower the calling thread's CPU priority (Linux: a thread's own nice value), so that the
    training threads win the CPU while a write is pickled, checksummed and copied into the page
    cache. The thread is the writer of one job and ends with it."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError):  # e.g. a seccomp profile that refuses setpriority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)


class _Job:
    __slots__ = ("_after_commit", "_go", "_snapshot", "_store", "outcome", "thread")

    def __init__(self, path: Path | URL, epoch: int, snapshot: Snapshot,
                 after_commit: Callable[[], None] | None, store: Store | None = None) -> None:
        self.outcome = WriteOutcome(path, epoch)
        self._store = store
        self._snapshot: Snapshot | None = snapshot
        self._after_commit = after_commit
        self._go = threading.Event()
        self.thread = threading.Thread(target=self._run, name="nnhandler-checkpoint-writer",
                                       daemon=False)

    def start(self) -> None:
        """Start the writer. It waits for ``_go`` (set once ``Thread.start`` has returned): a
        thread that ran Python right away would hold the GIL that ``Thread.start`` waits for,
        for up to a switch interval (5 ms) of the training thread's time."""
        self.thread.start()
        self._go.set()

    def _run(self) -> None:
        self._go.wait()
        _yield_cpu_to_training()
        outcome = self.outcome
        started = time.perf_counter()
        snapshot = self._snapshot
        assert snapshot is not None
        try:
            snapshot.wait()
            store = self._store
            if store is not None and not store.local:  # a URL: the store publishes it whole
                outcome.size = store.publish(outcome.path, lambda local: write_envelope(
                    local, snapshot.value, snapshot.records, io=snapshot.io))
            else:
                assert isinstance(outcome.path, Path)
                outcome.path.parent.mkdir(parents=True, exist_ok=True)
                outcome.size = write_envelope(outcome.path, snapshot.value, snapshot.records,
                                              io=snapshot.io)
            if self._after_commit is not None:
                self._after_commit()
        except BaseException as error:  # kept for the training thread, never lost
            outcome.error = error
        finally:
            self._snapshot = None  # the staging memory may be reused once the job is done
            outcome.seconds = time.perf_counter() - started


class BackgroundWriter:
    """Writes snapshots in a background thread, one at a time.

    Use: :meth:`wait` (collects the previous write's outcome), then ``staging.take(state)``,
    then :meth:`submit`. :meth:`poll` collects a finished write without blocking.
    """

    def __init__(self) -> None:
        self.staging = StagingBuffers()
        self._job: _Job | None = None

    @property
    def in_flight(self) -> bool:
        """A write was submitted and its outcome not collected yet (it may have finished)."""
        return self._job is not None

    def submit(self, path: Path | URL, epoch: int, snapshot: Snapshot,
               after_commit: Callable[[], None] | None = None, *,
               store: Store | None = None) -> None:
        """Start writing ``snapshot`` to ``path``; ``after_commit`` runs in the writer thread
        once the file is durable (removing a superseded file, say). ``store``: the object
        store of a URL ``path`` (the store publishes the file whole, in the writer thread:
        streamed into a multipart upload on S3, a local staging file uploaded elsewhere)."""
        if self._job is not None:
            raise RuntimeError("a background write is still in flight: wait() for it first")
        job = _Job(path, epoch, snapshot, after_commit, store)
        self._job = job
        with _UNCOLLECTED_LOCK:
            _UNCOLLECTED.add(job)
        job.start()

    def wait(self, timeout: float | None = None) -> WriteOutcome | None:
        """Block until the write in flight is done and return its outcome (``None`` when there
        is none, or when ``timeout`` ran out first)."""
        job = self._job
        if job is None:
            return None
        job.thread.join(timeout)
        return self._collect()

    def poll(self) -> WriteOutcome | None:
        """The outcome of a finished write (collected once), else ``None``."""
        return self._collect()

    def _collect(self) -> WriteOutcome | None:
        job = self._job
        if job is None or job.thread.is_alive():
            return None
        self._job = None
        with _UNCOLLECTED_LOCK:
            _UNCOLLECTED.discard(job)
        return job.outcome


@atexit.register
def _flush_at_exit() -> None:
    """Wait for every write nobody collected (Python has joined the non-daemon writer threads
    already; the join is for safety) and report the failures among them."""
    with _UNCOLLECTED_LOCK:
        jobs = list(_UNCOLLECTED)
        _UNCOLLECTED.clear()
    for job in jobs:
        job.thread.join()
        outcome = job.outcome
        if outcome.error is None:
            continue
        error = outcome.error
        message = (f"nnhandler: the background write of the epoch-{outcome.epoch} checkpoint "
                   f"{outcome.path} FAILED ({type(error).__name__}: {error}); the file was not "
                   "written")
        _LOGGER.error(message)
        print(message, file=sys.stderr, flush=True)
