"""The checkpointing seam: how any callback writes the complete training state.

A saver is an ordinary :class:`~nnhandler.Callback`. It decides *when* and *where*; the seam,
reachable in every hook as ``handler.checkpoints`` (a :class:`Checkpointer`), does the rest
exactly as for :class:`~nnhandler.AutoSaveCallback`, emergency checkpoints and
:meth:`NNHandler.save <nnhandler.NNHandler.save>`:

* **collect**: ``{state_key: state_dict()}`` of every :class:`~nnhandler.StateProvider` of the
  handler's :class:`~nnhandler.state.StateRegistry` (pending states of a loaded checkpoint
  included), every rank's random streams gathered first, checked to be plain data;
* **write** atomically with its integrity record (temp file, fsync, rename: a crash leaves the
  previous file intact), on rank 0 while the other ranks wait, rank 0's error raised on every
  rank; a model with DTensor parameters is written by every rank as a ``NAME.dcp`` directory;
* **snapshot** for a background write: the state copied into reused host staging memory, then
  written by a writer thread (:class:`BackgroundSave`, at most one write in flight);
* **announce**: a log line and ``on_checkpoint_saved(path=, epoch=)`` on every rank, once the
  file is durable.

A minimal saver::

    class EveryNEpochs(Callback):
        is_checkpoint_writer = True          # runs after the other callbacks of an event

        def __init__(self, every: int, folder: str) -> None:
            self.every, self.folder = every, Path(folder)

        def on_epoch_end(self, handler: Trainer, epoch: int, logs: dict[str, Any],
                         **kwargs: Any) -> None:
            if epoch % self.every == 0:                 # every rank calls save: collective
                handler.checkpoints.save(self.folder / f"ep{epoch:03d}.pth", logs)

A saver that can also write an emergency checkpoint (on a signal, or when an exception ends
training) implements :class:`EmergencySaver`; a saver whose state should bring it back on
:meth:`NNHandler.load <nnhandler.NNHandler.load>` registers a factory with
:func:`nnhandler.plugins.register_provider_factory`.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, runtime_checkable

from .checkpoint.background import BackgroundWriter, WriteOutcome
from .checkpoint.envelope import build_meta, ensure_plain, envelope_of, write_checkpoint
from .checkpoint.sharded import SHARDED_KEYS, SHARDED_SUFFIX, write_sharded_checkpoint
from .checkpoint.snapshot import Snapshot, StagingBuffers
from .checkpoint.storage import URL, location_of, store_for
from .components.history import is_plain
from .distributed import run_on_rank_zero
from .errors import ConfigurationError
from .events import Event, EventDispatcher

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from .checkpoint.dcp_state import ShardedComponents
    from .trainer import Trainer

__all__ = ["EMERGENCY_NAME", "BackgroundSave", "Checkpointer", "Emergency", "EmergencySaver",
           "SavedCheckpoint", "emergency_name"]

#: ``{reason}_ep{epoch:03d}_b{batches:05d}.pth``: the epoch a resume continues and how many of
#: its batches ran before the stop (``b00000`` after a complete epoch)
EMERGENCY_NAME: Final = "{reason}_ep{epoch:03d}_b{batches:05d}.pth"
PREEMPTED: Final = "preempted"
EXCEPTION: Final = "exception"


def emergency_name(reason: str, epoch: int, batches: int) -> str:
    """The file name of an emergency checkpoint: ``preempted_ep003_b00012.pth`` continues
    epoch 3 after its 12th batch; ``exception_…`` when an exception wrote it."""
    return EMERGENCY_NAME.format(reason=reason, epoch=epoch, batches=batches)


@dataclass(frozen=True)
class SavedCheckpoint:
    """A durable checkpoint: where, for which epoch, its size in bytes and the seconds its
    write took. ``path`` is a :class:`~nnhandler.checkpoint.storage.URL` (a ``str``) for a
    checkpoint in object storage."""

    path: Path | URL
    epoch: int
    size: int
    seconds: float


class Checkpointer:
    """The checkpointing seam of one handler (``handler.checkpoints``): the one way to write
    the complete training state. Every method is collective under DDP: every rank calls it at
    the same point (rank 0 writes, the others wait; rank 0's error is raised on every rank).

    Built by :class:`~nnhandler.NNHandler`; ``rng_gathered`` gathers every rank's random
    streams for the duration of a collect, ``dispatcher`` fires ``CHECKPOINT_SAVED`` and
    ``sharded_components`` describes a DTensor model for ``torch.distributed.checkpoint``.
    """

    __slots__ = ("_dispatcher", "_rng_gathered", "_sharded_components", "_trainer")

    def __init__(self, trainer: Trainer, *,
                 rng_gathered: Callable[[], AbstractContextManager[object]],
                 dispatcher: EventDispatcher,
                 sharded_components: Callable[[], ShardedComponents]) -> None:
        self._trainer = trainer
        self._rng_gathered = rng_gathered
        self._dispatcher = dispatcher
        self._sharded_components = sharded_components

    # -- writing -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str],
             logs: Mapping[str, Any] | None = None, *,
             storage_options: Mapping[str, Any] | None = None) -> SavedCheckpoint:
        """Write the complete checkpoint to ``path`` and return once it is durable, then
        announce it (``on_checkpoint_saved``). ``logs`` go into the file's ``meta`` (plain
        scalars only) and its integrity record; the default is ``trainer.last_logs`` (those of
        the last ``train`` call), so a hook that has the epoch's ``logs`` passes them.

        A model with DTensor parameters (``trainer.sharded_checkpoints``) is written as a
        directory: ``path`` must end in ``.dcp``, every rank writes its own shards, and the
        directory appears only once it is complete.

        ``path`` may be an fsspec URL (``s3://bucket/run/ep010.pth``; ``storage_options`` go to
        fsspec, and without them the store's standard configuration applies, such as
        ``AWS_ENDPOINT_URL`` and credentials from the environment): the file is written
        locally with its CRC-32, then uploaded whole, so that no partial object is ever
        visible under its name (docs page "Object storage"). Needs ``nnhandler[remote]``.
        """
        trainer = self._trainer
        location = location_of(path)
        logs = dict(trainer.last_logs if logs is None else logs)
        if isinstance(location, URL):
            return self._save_remote(location, logs, storage_options)
        store_for(location, storage_options)  # local: options would be a mistake
        path = location

        def write() -> tuple[int, float]:
            _refuse_directory(path)  # checked on rank 0 only: other ranks may not share its disk
            if path.suffix == SHARDED_SUFFIX:
                raise ConfigurationError(
                    f"save path {str(path)!r}: {SHARDED_SUFFIX!r} names a sharded checkpoint "
                    "directory, but this model has no DTensor parameters; use '.pth'")
            started = time.perf_counter()
            path.parent.mkdir(parents=True, exist_ok=True)
            size = write_checkpoint(path, trainer.state_registry.collect(), self.meta(logs))
            return size, time.perf_counter() - started

        def write_sharded() -> tuple[int, float]:
            started = time.perf_counter()
            size = write_sharded_checkpoint(
                path, trainer.distributed, self._sharded_components(),
                lambda: (trainer.state_registry.collect(exclude=SHARDED_KEYS), self.meta(logs)))
            return size, time.perf_counter() - started

        with self._rng_gathered():
            if trainer.sharded_checkpoints:
                size, seconds = write_sharded()
            else:
                size, seconds = run_on_rank_zero(trainer.distributed, write)
        saved = SavedCheckpoint(path, trainer.epoch, size, seconds)
        self.announce(saved)
        return saved

    def _save_remote(self, url: URL, logs: dict[str, Any],
                     storage_options: Mapping[str, Any] | None) -> SavedCheckpoint:
        """:meth:`save` to a URL: written and uploaded on rank 0 while the other ranks wait
        (its error, a timeout after bounded retries included, is raised on every rank)."""
        trainer = self._trainer
        if trainer.sharded_checkpoints:
            return self._save_remote_sharded(url, logs, storage_options)

        def write() -> tuple[int, float]:
            from .checkpoint.remote_checkpoints import publish_checkpoint

            started = time.perf_counter()
            size = publish_checkpoint(url, lambda local: write_checkpoint(
                local, trainer.state_registry.collect(), self.meta(logs)), storage_options)
            return size, time.perf_counter() - started

        with self._rng_gathered():
            size, seconds = run_on_rank_zero(trainer.distributed, write)
        saved = SavedCheckpoint(url, trainer.epoch, size, seconds)
        self.announce(saved)
        return saved

    def _save_remote_sharded(self, url: URL, logs: dict[str, Any],
                             storage_options: Mapping[str, Any] | None) -> SavedCheckpoint:
        """:meth:`save` of a model with DTensor parameters to a URL: every rank uploads its
        shards, rank 0 the envelope and, once every rank succeeded, the manifest
        (:mod:`~nnhandler.checkpoint.remote_sharded`)."""
        from .checkpoint.remote_sharded import write_remote_sharded

        trainer = self._trainer
        started = time.perf_counter()
        with self._rng_gathered():
            size = write_remote_sharded(
                url, trainer.distributed, self._sharded_components(),
                lambda: (trainer.state_registry.collect(exclude=SHARDED_KEYS), self.meta(logs)),
                storage_options)
        saved = SavedCheckpoint(url, trainer.epoch, size, time.perf_counter() - started)
        self.announce(saved)
        return saved

    def meta(self, logs: Mapping[str, Any]) -> dict[str, Any]:
        """The ``meta`` of a checkpoint written now: epoch, step, the plain scalars of
        ``logs``, world size, versions, time and the run's lineage."""
        trainer = self._trainer
        return build_meta(epoch=trainer.epoch, step=trainer.global_step,
                          logs={k: v for k, v in logs.items() if is_plain(v)},
                          world_size=trainer.distributed.world_size,
                          lineage=trainer.progress.lineage)

    def snapshot(self, path: Path | URL, logs: Mapping[str, Any],
                 staging: StagingBuffers) -> Snapshot | None:
        """The complete checkpoint (as :meth:`save` would write it to ``path``) copied into
        ``staging`` on rank 0, for a background write; ``None`` on the other ranks. Prefer
        :class:`BackgroundSave`, which writes and reports it.

        An error on rank 0 (a provider that raises, state that is not plain data) is raised on
        every rank. Not for a model with DTensor parameters (its shards live on every rank).
        """
        trainer = self._trainer
        logs = dict(logs)

        def take() -> Snapshot:
            if isinstance(path, Path):
                _refuse_directory(path)
            state, meta = trainer.state_registry.collect(), self.meta(logs)
            ensure_plain(state)
            ensure_plain(meta, "meta")
            return staging.take(envelope_of(state, meta))

        with self._rng_gathered():
            return run_on_rank_zero(trainer.distributed, take, share_result=False)

    def announce(self, saved: SavedCheckpoint) -> None:
        """Log a durable checkpoint and fire ``on_checkpoint_saved`` (every rank calls it).
        :meth:`save` announces by itself; a background write is announced by its saver once
        :meth:`BackgroundSave.settle` has reported it."""
        self._trainer.logger.info("saved checkpoint %s (%.1f MB, %.2f s)", saved.path,
                                  saved.size / 1e6, saved.seconds)
        self._dispatcher.fire(Event.CHECKPOINT_SAVED, handler=self._trainer, path=saved.path,
                              epoch=saved.epoch)


@dataclass(frozen=True)
class _Pending:
    path: Path | URL
    epoch: int


class BackgroundSave:
    """Checkpoints written in the background through the seam, one at a time (what
    ``AutoSaveCallback(async_save=True)`` uses): training pays only for a snapshot into
    reused host staging memory; a non-daemon writer thread at the lowest CPU priority writes
    the file under the same atomicity and integrity rules as :meth:`Checkpointer.save`.

    Use, from hooks that every rank runs: :meth:`start` a write, later :meth:`settle` it
    (``wait=False`` in a hot path, ``wait=True`` before the next start and at the end of
    ``train``) and announce what it returns with :meth:`Checkpointer.announce`. The staging
    memory and its plan are kept for the next snapshot (a first one plans anew, ~30 us per
    tensor), also across ``train`` calls; :meth:`release` gives them back.
    """

    __slots__ = ("_pending", "_writer")

    def __init__(self) -> None:
        self._writer: BackgroundWriter | None = None
        self._pending: _Pending | None = None

    @property
    def in_flight(self) -> Path | URL | None:
        """The checkpoint being written whose outcome :meth:`settle` has not reported yet."""
        return None if self._pending is None else self._pending.path

    @property
    def staging(self) -> StagingBuffers | None:
        """The staging memory snapshots are copied into (``None`` before the first start)."""
        return None if self._writer is None else self._writer.staging

    def start(self, trainer: Trainer, path: Path | URL, epoch: int, logs: Mapping[str, Any], *,
              after_commit: Callable[[], None] | None = None,
              storage_options: Mapping[str, Any] | None = None) -> None:
        """Snapshot the state (collective) and hand it to the writer thread on rank 0.
        ``after_commit`` runs in the writer thread once the file is durable (rank 0). An error
        of the snapshot is raised on every rank and nothing is in flight then. ``path`` may be
        a URL (``storage_options`` for fsspec): the writer thread then writes a local staging
        file and uploads it whole, so training waits for neither."""
        if self._pending is not None:
            raise RuntimeError(f"a background write of {self._pending.path} is in flight: "
                               "settle(wait=True) it first")
        if self._writer is None:
            self._writer = BackgroundWriter()
        store = store_for(path, storage_options) if isinstance(path, URL) else None
        snapshot = trainer.checkpoints.snapshot(path, logs, self._writer.staging)
        self._pending = _Pending(path, epoch)
        if snapshot is not None:  # rank 0
            self._writer.submit(path, epoch, snapshot, after_commit, store=store)

    def settle(self, trainer: Trainer, *, wait: bool) -> SavedCheckpoint | None:
        """The write in flight once it is durable (``wait=False``: only if it already is;
        ``None`` otherwise or when none is in flight). Collective: rank 0's outcome reaches
        every rank, its error is raised on every rank (and nothing is in flight after it)."""
        pending, writer = self._pending, self._writer
        if pending is None or writer is None:
            return None

        def collect() -> tuple[int, float] | None:
            outcome = writer.wait() if wait else writer.poll()
            if outcome is None:
                return None
            if outcome.error is not None:
                raise outcome.error
            return outcome.size, outcome.seconds

        try:
            result = run_on_rank_zero(trainer.distributed, collect)
        except Exception:
            self._pending = None
            raise
        if result is None:
            return None
        self._pending = None
        return SavedCheckpoint(pending.path, pending.epoch, *result)

    def wait_locally(self) -> WriteOutcome | None:
        """Wait for the write in flight without a collective and forget it: rank 0 gets its
        outcome, the other ranks ``None``. For ``on_exception``, when the other ranks may be
        anywhere."""
        pending, self._pending = self._pending, None
        if pending is None or self._writer is None:
            return None
        return self._writer.wait()

    def release(self) -> None:
        """Give the staging memory and its plan back (the next snapshot makes them again)."""
        if self._writer is not None:
            self._writer.staging.release()


@dataclass(frozen=True)
class Emergency:
    """Why and where an emergency checkpoint is written: ``reason`` ``"preempted"`` (a watched
    signal stopped training) or ``"exception"``; ``epoch`` is the epoch a resume continues and
    ``batches`` how many of its batches ran (``0``: training stopped after epoch
    ``epoch - 1``)."""

    reason: Literal["preempted", "exception"]
    epoch: int
    batches: int

    @property
    def file_name(self) -> str:
        """The conventional name, ``preempted_ep003_b00012.pth``."""
        return emergency_name(self.reason, self.epoch, self.batches)


@runtime_checkable
class EmergencySaver(Protocol):
    """A callback that can write an emergency checkpoint. ``train`` asks every callback that
    satisfies this protocol and declares signals or ``saves_on_exception``.

    On a watched signal training stops at the next optimizer step (under DDP every rank at
    the same one), then, for each such saver, ``flush`` and ``save_emergency`` run on every
    rank (collective: write through ``trainer.checkpoints``); the state then records the
    position inside the epoch, so a resumed run continues from the next batch. A failure of
    ``save_emergency`` may be reported and swallowed (return ``None``) or raised, as the
    saver's policy says. When an exception ends training (single process only),
    ``save_emergency`` must raise its failure: it becomes a note on the exception.
    """

    @property
    def emergency_signals(self) -> tuple[signal.Signals, ...]:
        """The signals that stop training with an emergency checkpoint (``()``: none)."""
        ...

    @property
    def saves_on_exception(self) -> bool:
        """Whether an exception escaping an epoch gets an emergency checkpoint."""
        ...

    @property
    def emergency_directory(self) -> Path | URL:
        """Where the emergency checkpoints go (two savers may not share one)."""
        ...

    def flush(self, trainer: Trainer) -> None:
        """Settle any write in flight (collective); raise its failure if the policy says so."""
        ...

    def save_emergency(self, trainer: Trainer, emergency: Emergency) -> Path | URL | None:
        """Write the emergency checkpoint synchronously; its path, or ``None`` when none was
        written (a failure the saver reported)."""
        ...


def _refuse_directory(path: Path) -> None:
    if path.is_dir():
        raise ConfigurationError(f"save path {str(path)!r} is a directory")
