"""``AutoSaveCallback``: writes the complete training state every N epochs."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint.removal import RemovalGuard
from ..checkpoint.retention import Retention, RetentionPlan, RetentionRules
from ..checkpoint.schema import validate
from ..checkpoint.sharded import checkpoint_size, sharded_name
from ..checkpoint.storage import URL, same_location
from ..checkpointing import BackgroundSave, Emergency
from ..config import AutoSaveConfig
from ..distributed import run_on_rank_zero
from ..errors import CheckpointSchemaError, ConfigurationError, DuplicateStateKeyError
from ..events import Event
from ..naming import RenderedName, name_limit, render_name, template_fields
from ..plugins import register_provider_factory
from .autosave_files import (
    check_log_keys,
    name_fields,
    own_target,
    plan_retention,
    prepare_directory,
    removal_guard,
    remove_previous,
    remove_superseded,
    resume_retention,
    save_through_seam,
    warn_about_name,
    warn_if_disk_is_short,
)
from .autosave_mirror import MirrorUploads
from .autosave_options import AutoSaveOptions, auto_save_config, options_repr
from .autosave_schedule import SaveSchedule
from .autosave_state import AutoSaveStateRecord
from .base import Callback

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..loop import MidEpoch
    from ..trainer import Trainer

__all__ = ["AUTOSAVE_KEY_PREFIX", "AutoSaveCallback", "AutoSaveStateRecord"]

#: the claim (see :func:`~nnhandler.plugins.register_provider_factory`) of every auto-saver's
#: state key, ``autosave:<save_path>/<name>``
AUTOSAVE_CLAIM = "autosave"
AUTOSAVE_KEY_PREFIX = f"{AUTOSAVE_CLAIM}:"

#: (last_saved_path, last_saved_epoch, save_count, pending_removal) before a save
_Bookkeeping = tuple[str | None, int | None, int, str | None]


@dataclass(frozen=True)
class _BackgroundSave:
    """An auto-save written in the background, and the bookkeeping to restore if it fails."""

    path: Path | URL
    epoch: int
    previous: _Bookkeeping
    retention: RetentionPlan | None = None


class AutoSaveCallback(Callback):
    """Save the complete training state (a checkpoint) by epochs, optimizer steps or
    training time.

    Args:
        interval: ``None`` or ``0``: no epoch schedule. ``N > 0``: after every epoch whose
            absolute 1-based number is a multiple of N (counted across resumes). ``-1``: after
            the last epoch of each ``train`` call (also when the call stops early). Anything
            else, including ``"5"``, ``2.0`` and ``True``, is a validation error.
        save_path: directory for the files; rank 0 creates it (with parents) at the first save.
            An existing path that is not a directory is a ``ValueError``. An fsspec URL
            (``s3://bucket/run``; keyword ``storage_options``) keeps every rule on a store
            (docs page "Object storage").
        name: ``str.format`` template filled with the logs: at an epoch's end ``epoch``,
            ``loss``, ``val_loss``, each metric and ``val_<metric>``, keys added by callbacks,
            ``step`` (the global optimizer step) and ``batch`` (the epoch's batches); inside an
            epoch ``epoch`` (the one in progress), ``batch`` (its batches done), ``step`` and the
            running means of ``loss`` and each metric. ``.pth`` is appended unless present
            (``.dcp``, a directory, for a model with DTensor parameters). A key missing at save
            time is written as ``NA`` (explained once, see ``nnhandler.naming``; keys that
            exist only at an epoch's end are not warned about inside one): the checkpoint is
            saved anyway. Rejected when configured (``ValueError`` naming the template and
            why): directory parts and ``..``, control characters, ``!r``/``!a``, the ``c``
            type and templates that can render more than
            :data:`~nnhandler.naming.MAX_NAME_BYTES` (225) UTF-8 bytes. Formatted values are
            sanitised to stay in ``save_path``; a name too long for the filesystem is clipped
            to ``<start>~<8 hex of its SHA-1>.pth`` with a warning. A name that exists and is
            not this run's checkpoint is never replaced: the save goes to ``<stem>-v<N>.pth``
            with one warning per callback; a file of this run's own lineage is replaced
            atomically.
        overwrite: keep only the latest auto-save. The new file is completely written before
            the previous one is removed; with a fixed name the new file atomically replaces the
            old one.

    Keyword-only options (the same for :meth:`NNHandler.auto_save`): ``every_n_steps``,
    ``every_seconds`` (save by optimizer steps, by training time), ``on_save_error``,
    ``async_save``, ``save_on_signal``/``save_on_exception`` (or ``emergency=``),
    ``keep_last``/``keep_best``/``monitor``/``mode``/``keep_every``/``keep_every_n_steps``
    (or ``keep=``), ``mirror`` (each checkpoint uploaded to a URL too, in the background:
    ``nnhandler.callbacks.autosave_mirror``, docs page "Object storage"), each documented on
    :class:`~nnhandler.callbacks.AutoSaveOptions`; an unknown one is a
    :class:`~nnhandler.ConfigurationError` that suggests the nearest name.

    Retention (the ``keep_*`` rules; positive ints, combinable, not with ``overwrite=True``): a
    file is kept when *any* rule keeps it, and the newest auto-save is always kept; without a
    rule every file is kept. Once a new file is durable, rank 0 records what is kept and why
    in ``save_path/nnhandler-index.json``, then removes this callback's files that no rule
    keeps. Only the callback's own files (its lineage's, as the checkpoint and the index
    record them) are ever removed, each confined by :mod:`nnhandler.checkpoint.removal`
    (directly inside ``save_path``, no symlink, one of its names, its own record naming this
    run's lineage). See :mod:`nnhandler.checkpoint.retention`.

    When ``train`` starts, rank 0 creates ``save_path``, checks that it can write there (an
    unwritable directory is a :class:`~nnhandler.ConfigurationError` before any epoch runs) and
    removes temp files that crashed writers left behind. Before each save it warns when the free
    space is below twice the expected checkpoint size.

    The callback is a :class:`~nnhandler.StateProvider`: its configuration and bookkeeping
    (the file it wrote last, with ``overwrite`` the one it has still to remove, the files it
    keeps, the training time since its last save) go into every checkpoint, so a resumed
    handler keeps saving by the same rules. Its ``state_key`` is derived from ``save_path``
    and ``name``; two callbacks writing the same files are a
    :class:`~nnhandler.DuplicateStateKeyError`. Under DDP every rank runs it; rank 0 writes while
    the others wait, and an error on rank 0 is raised on every rank.
    """

    is_checkpoint_writer = True

    def __init__(
        self,
        interval: int | None = None,
        save_path: str | os.PathLike[str] = ".",
        name: str = "model_epoch{epoch:02d}",
        overwrite: bool = False,
        **options: Unpack[AutoSaveOptions],
    ) -> None:
        self.config = auto_save_config(interval, save_path, name, overwrite, options)
        #: when to save (epochs, steps, training time) and the time accounting
        self.schedule = SaveSchedule(self.config)
        #: which of its files the callback keeps and why (see :mod:`~..checkpoint.retention`)
        self.retention = Retention()
        self.last_saved_path: str | None = None
        self.last_saved_epoch: int | None = None
        #: overwrite: the previous auto-save, recorded in the new file until it is removed, so a
        #: run resumed after a crash between the write and the removal still removes it
        self.pending_removal: str | None = None
        self.save_count = 0
        self.failed_saves = 0
        self._call_start_epoch = 0
        self._call_end_epoch = 0
        self._call_failures = 0
        self._last_size: int | None = None
        self._background = BackgroundSave()
        self._in_flight: _BackgroundSave | None = None
        self.mirror = MirrorUploads(lambda: (self.config, self.state_key, self._earlier_templates))
        self._told_name_taken = False
        #: name template keys whose absence from the logs has been explained (said once)
        self._reported_keys: set[str] = set()
        #: check_log_keys has run in this train call
        self._keys_checked = False
        #: name templates this instance was configured with before (see reconfigure)
        self._earlier_templates: tuple[str, ...] = ()

    # -- configuration -------------------------------------------------------------------------
    @staticmethod
    def key_for(config: AutoSaveConfig) -> str:
        directory = (config.save_path if isinstance(config.save_path, URL)
                     else Path(os.path.normpath(config.save_path)).as_posix())
        return f"{AUTOSAVE_KEY_PREFIX}{directory}/{config.name}"

    @property
    def state_key(self) -> str:
        return self.key_for(self.config)

    def writes_same_files_as(self, other: AutoSaveCallback) -> bool:
        """True when both would write the same files (same directory, same name)."""
        return (self.config.name == other.config.name
                and same_location(self.config.save_path, other.config.save_path))

    def check_registration(self, callbacks: Sequence[Callback]) -> None:
        """Refuse to join ``callbacks`` beside an auto-saver that writes the same files under
        another key (``"ck"`` and its absolute path: the registry tells equal keys apart)."""
        for other in callbacks:
            if (isinstance(other, AutoSaveCallback) and other is not self
                    and other.state_key != self.state_key
                    and self.writes_same_files_as(other)):
                raise DuplicateStateKeyError(
                    f"{self!r} would write the same files as {other!r}; give one of them a "
                    "different save_path or name"
                )

    @classmethod
    def from_state(cls, state_key: str, state: Any) -> AutoSaveCallback:
        """The auto-saver a checkpoint's ``state[state_key]`` describes, configured as it was
        (bookkeeping restored with the other states); ``config`` validated (untrusted)."""
        where = f"state[{state_key!r}]"
        if not isinstance(state, dict):
            raise CheckpointSchemaError(f"{where} is {state!r:.80}, not a dict", field=where)
        config = validate(AutoSaveConfig, state.get("config"), where=f"{where}.config")
        return cls(**config.model_dump())

    def reconfigure(self, config: AutoSaveConfig) -> None:
        """Apply a new configuration, keeping the bookkeeping of this instance's lineage (with
        ``overwrite``, the file saved under the previous name is still removed at the next
        save, if it is in the new ``save_path``)."""
        if config.name != self.config.name:
            self._earlier_templates = (*self._earlier_templates, self.config.name)
            self._reported_keys = set()
        self.config = config
        self.schedule.configure(config)

    def listens_to(self, event: Event) -> bool:
        """The per-step event only with a step or time trigger or ``{batch}`` in the name (the
        epoch's length): with ``interval`` alone no per-step event (``EventDispatcher.rebuild``)."""
        return (event is not Event.TRAIN_STEP_END or self.config.saves_inside_epochs
                or "batch" in template_fields(self.config.name))

    @property
    def background(self) -> BackgroundSave:
        """The background writes of ``async_save`` (``staging`` memory, ``in_flight``)."""
        return self._background

    @property
    def write_in_flight(self) -> Path | URL | None:
        """The checkpoint being written in the background and not yet reported, if any."""
        return self._background.in_flight

    def __repr__(self) -> str:
        return f"AutoSaveCallback({options_repr(self.config)})"

    # -- hooks ---------------------------------------------------------------------------------
    def on_train_begin(
        self, handler: Trainer, start_epoch: int, end_epoch: int, **kwargs: Any
    ) -> None:
        if self._in_flight is not None:  # a save_now() by hand before this call
            self.flush(handler)
        if self.config.enabled and self.config.async_save and handler.sharded_checkpoints:
            # the background writer stages one file on rank 0; DTensor shards live on every rank
            raise ConfigurationError(
                f"{self!r}: async_save=True cannot write a sharded checkpoint (the model holds "
                "DTensor parameters, e.g. FSDP2); use async_save=False"
            )
        self._call_start_epoch = start_epoch
        self._call_end_epoch = end_epoch
        self._call_failures = 0
        self._keys_checked = False
        self.schedule.begin_call(handler)
        if self.config.enabled or self.config.writes_emergency_checkpoints:
            guard = self._guard(handler)
            self.last_saved_path = run_on_rank_zero(
                handler.distributed, lambda: prepare_directory(
                    self.config, handler, guard, last_saved_path=self.last_saved_path,
                    pending_removal=self.pending_removal))
            self.pending_removal = None
            resume_retention(self.retention, self.retention_rules, self.state_key, handler,
                             guard, self.mirror)

    def _guard(self, handler: Trainer) -> RemovalGuard:
        return removal_guard(self.config, handler, self._earlier_templates)

    def on_epoch_end(
        self, handler: Trainer, epoch: int, logs: dict[str, Any], **kwargs: Any
    ) -> None:
        if self._in_flight is not None:  # a background write that has finished is reported now
            self._settle(handler, wait=False)
        if self.config.enabled and not self._keys_checked:
            self._keys_checked = True
            check_log_keys(self.config, handler, self.retention, epoch,
                           name_fields(handler, epoch, logs, self.schedule.epoch_batches),
                           self._reported_keys)
        last_of_call = epoch >= self._call_end_epoch or handler.stop_requested
        if self.schedule.at_epoch_end(epoch, last_of_call=last_of_call,
                                      is_main=handler.distributed.is_main):
            self.save_now(handler, epoch, logs)

    def on_train_step_end(self, handler: Trainer, step: int, mid_epoch: MidEpoch,
                          **kwargs: Any) -> None:
        """After an optimizer step: a step or time trigger saves here, inside the epoch (the
        checkpoint records the partial epoch, so it resumes from the next batch)."""
        schedule = self.schedule
        schedule.epoch_batches = mid_epoch.epoch_batches or mid_epoch.batches
        if schedule.at_step(step, mid_epoch.last, handler.distributed.is_main):
            with mid_epoch.recorded() as logs:
                path = self.save_now(handler, handler.epoch, logs, batch=mid_epoch.batches)
            if path is not None:  # a signal's stop at this step takes this file
                schedule.saved_at = (step, mid_epoch.epoch, mid_epoch.batches, str(path))

    def on_train_end(self, handler: Trainer, logs: dict[str, Any], **kwargs: Any) -> None:
        # interval=-1 when the call ended before its planned last epoch by another route
        ran_epochs = handler.epoch > self._call_start_epoch
        if (
            self.config.interval == -1
            and ran_epochs
            and self.last_saved_epoch != handler.epoch
            and not handler.stopped_mid_epoch  # the state is no longer that epoch's end
        ):
            self.save_now(handler, handler.epoch, logs)
        if self._in_flight is not None:
            self.flush(handler)
        self.mirror.report(handler, wait=True)
        self.schedule.end_call()
        # the staging memory and plan stay for the next call: they go with the callback
        self.schedule.waits.report(handler.logger, str(self.config.save_path))
        if self._call_failures:
            handler.logger.error(
                "%d auto-save(s) to %s failed during this train call (see the errors above); "
                "%s", self._call_failures, self.config.save_path,
                f"the last successful one is {self.last_saved_path}"
                if self.last_saved_path is not None else "no auto-save has succeeded yet",
            )

    # -- saving --------------------------------------------------------------------------------
    def path_for(self, logs: dict[str, Any], *,
                 sharded: bool = False) -> tuple[Path | URL, RenderedName]:
        """Where the checkpoint for ``logs`` goes, and the rendered name (with the template
        keys missing from the logs and, for a name clipped to the filesystem's limit, the full
        name). ``sharded``: the name of a sharded checkpoint directory (``….dcp``)."""
        rendered = render_name(self.config.name, logs, limit=name_limit(self.config.save_path))
        file_name = sharded_name(rendered.name) if sharded else rendered.name
        return self.config.save_path / file_name, rendered

    def save_now(self, handler: Trainer, epoch: int, logs: dict[str, Any], *,
                 batch: int | None = None) -> Path | URL | None:
        """Write a checkpoint for ``epoch`` now, then apply the ``overwrite`` or retention rules
        (``batch``: inside the epoch after ``epoch``, after that many batches; ``logs`` are
        then the running ones of ``MidEpoch.recorded()``, see ``nnhandler.loop``). A scheduled save:
        the ``every_seconds`` clock restarts.

        Returns the path, or ``None`` when the save failed under ``on_save_error="warn"``.
        """
        self.schedule.restart_clock()
        try:
            return self._save(handler, epoch, logs, batch=batch)
        except Exception as error:
            self._save_failed(handler, epoch, error)
            return None

    def _save_failed(self, handler: Trainer, epoch: int, error: Exception) -> None:
        """Apply ``on_save_error`` to the failed save of ``epoch``."""
        if self.config.on_save_error == "raise":
            raise error
        self.failed_saves += 1
        self._call_failures += 1
        handler.logger.error("AUTO-SAVE FAILED at epoch %d (%s: %s); %s and training continues; "
                             "the next scheduled save will try again", epoch,
                             type(error).__name__, error, self.previous_checkpoint_note())

    def previous_checkpoint_note(self) -> str:
        """What a failure report says of the checkpoint before it: ``"the previous checkpoint
        ck/ep004.pth is intact"`` (``"no earlier checkpoint exists"`` before a first save)."""
        if self.last_saved_path is None:
            return "no earlier checkpoint exists"
        return f"the previous checkpoint {self.last_saved_path} is intact"

    def _save(self, handler: Trainer, epoch: int, logs: dict[str, Any], *,
              path: Path | URL | None = None, synchronous: bool = False,
              batch: int | None = None) -> Path | URL:
        """Save under this callback's bookkeeping: to the scheduled name for ``logs``, or to
        ``path`` (emergency checkpoints); ``synchronous`` even with ``async_save``;
        ``batch``: inside an epoch (see :meth:`save_now`)."""
        self._wait_for_write(handler)
        self.mirror.report(handler)
        rendered = RenderedName("", ())
        emergency = path is not None
        if path is None:
            fields = logs if batch is not None else name_fields(
                handler, epoch, logs, self.schedule.epoch_batches)
            path, rendered = self.path_for(fields, sharded=handler.sharded_checkpoints)
        warn_about_name(self.config, handler, rendered, epoch, logs, path, self._reported_keys,
                        mid_epoch=batch is not None)
        chosen = own_target(handler, path, warn=not self._told_name_taken,
                            storage_options=self.config.save_path_options)
        self._told_name_taken = self._told_name_taken or chosen != path
        path = chosen
        if handler.distributed.is_main:
            warn_if_disk_is_short(self.config, handler, self._last_size)
        previous: _Bookkeeping = (self.last_saved_path, self.last_saved_epoch, self.save_count,
                                  self.pending_removal)
        # bookkeeping first, so the file records itself as this lineage's latest save (and,
        # with overwrite, the file a resumed run must still remove if we crash before that)
        self.last_saved_path, self.last_saved_epoch = str(path), epoch
        self.save_count += 1
        if self.config.overwrite and previous[0] is not None and previous[0] != str(path):
            self.pending_removal = previous[0]
        plan = plan_retention(self.retention, self.retention_rules, self.state_key, handler,
                              path, epoch, logs, partial=emergency, batch=batch)
        try:
            if self.config.async_save and not synchronous:
                self._save_in_background(handler, path, epoch, logs, previous, plan)
                return path
            save_through_seam(handler, path, logs, self.config.save_path_options)
        except BaseException:
            self._roll_back(previous, plan)
            raise
        if plan is not None and handler.distributed.is_main:
            self._commit_retention(handler, plan)
        if handler.distributed.is_main and isinstance(path, Path):
            with contextlib.suppress(OSError):  # only feeds the free-space warning
                self._last_size = checkpoint_size(path)
        if self.config.overwrite:
            guard = self._guard(handler)
            for old in {previous[0], previous[3]}:
                if old is not None:
                    remove_previous(handler, old, path, guard)
            self.pending_removal = None
        self.mirror.completed(handler, path, previous)
        return path

    # -- background saving ---------------------------------------------------------------------
    def _wait_for_write(self, handler: Trainer) -> None:
        """At most one write in flight: a save first waits for the previous one (a scheduled
        save is never skipped); a wait is counted and reported once at the end of ``train``."""
        if self._in_flight is None:
            return
        self._settle(handler, wait=False)
        if self._in_flight is None:
            return
        started = time.perf_counter()
        self.flush(handler)
        self.schedule.waits.add(time.perf_counter() - started)

    def _save_in_background(self, handler: Trainer, path: Path | URL, epoch: int,
                            logs: dict[str, Any], previous: _Bookkeeping,
                            plan: RetentionPlan | None = None) -> None:
        """Snapshot the state (collective) and hand it to the writer thread (rank 0)."""
        after_commit = None
        if self.config.overwrite:
            superseded = [old for old in {previous[0], previous[3]} if old is not None]
            after_commit = functools.partial(remove_superseded, handler, superseded, path,
                                             self._guard(handler))
        elif plan is not None:  # index, then removals: in the writer thread, once durable
            after_commit = functools.partial(self._commit_retention, handler, plan)
        self._background.start(handler, path, epoch, logs, after_commit=after_commit,
                               storage_options=self.config.save_path_options)
        self._in_flight = _BackgroundSave(path, epoch, previous, plan)

    def flush(self, handler: Trainer) -> None:
        """Wait for the background write in flight, if any, and report it as a save: on success
        ``on_checkpoint_saved`` fires; a failure follows ``on_save_error``. Under DDP every rank
        calls it (rank 0's outcome reaches every rank)."""
        self._settle(handler, wait=True)

    def _settle(self, handler: Trainer, *, wait: bool) -> None:
        """Report the background write once it is done (``wait=False``: only if it is)."""
        pending = self._in_flight
        if pending is None:
            return
        try:
            saved = self._background.settle(handler, wait=wait)
        except Exception as error:
            self._in_flight = None
            self._roll_back(pending.previous, pending.retention)
            self._save_failed(handler, pending.epoch, error)
            return
        if saved is None:
            return
        self._in_flight = None
        self._last_size = saved.size
        if self.config.overwrite:
            self.pending_removal = None
        handler.checkpoints.announce(saved)
        self.mirror.completed(handler, saved.path, pending.previous)

    def on_exception(self, handler: Trainer, exception: BaseException, **kwargs: Any) -> None:
        """Training is failing: wait for the write in flight (rank 0, no collective — the other
        ranks may be anywhere) and log its outcome; a failure is also noted on ``exception``."""
        self.schedule.abandon_call()
        pending, self._in_flight = self._in_flight, None
        if pending is None:
            return
        outcome = self._background.wait_locally()
        if outcome is None:  # not rank 0: the outcome is rank 0's to report
            return
        if outcome.error is None:
            if self.config.overwrite:
                self.pending_removal = None
            handler.logger.info("saved checkpoint %s (%.1f MB, %.2f s) while training failed",
                                outcome.path, outcome.size / 1e6, outcome.seconds)
            return
        self._roll_back(pending.previous, pending.retention)
        self.failed_saves += 1
        self._call_failures += 1
        error = outcome.error
        handler.logger.error("AUTO-SAVE FAILED at epoch %d (%s: %s) in the background while "
                             "training failed; %s", pending.epoch, type(error).__name__,
                             error, self.previous_checkpoint_note())
        exception.add_note(f"the background auto-save of epoch {pending.epoch} to "
                           f"{pending.path} failed too: {type(error).__name__}: {error}")

    # -- emergency checkpoints (nnhandler.checkpointing.EmergencySaver) ------------------------
    @property
    def emergency_signals(self) -> tuple[signal.Signals, ...]:
        """The signals of ``save_on_signal`` (``()`` when it is off)."""
        return self.config.signals

    @property
    def saves_on_exception(self) -> bool:
        return self.config.save_on_exception

    @property
    def emergency_directory(self) -> Path | URL:
        return self.config.save_path

    def save_emergency(self, handler: Trainer, emergency: Emergency) -> Path | URL | None:
        """Write the emergency checkpoint ``emergency.file_name`` into ``save_path``
        synchronously, under this callback's bookkeeping (overwrite lineage, retention,
        ``on_checkpoint_saved``), after its background write in flight has been settled.
        After a complete epoch that this callback has just saved, that file is the
        checkpoint. A failure of a signal's save follows ``on_save_error``; an exception's
        is raised (the caller notes it on the exception)."""
        if self.last_saved_path and (
                (emergency.batches == 0 and self.last_saved_epoch == handler.epoch)
                or self.schedule.saved_at == (handler.global_step, emergency.epoch,
                                              emergency.batches, self.last_saved_path)):
            return Path(self.last_saved_path)
        name = emergency.file_name
        target = self.config.save_path / (sharded_name(name) if handler.sharded_checkpoints
                                          else name)
        logs = dict(handler.history[-1]) if handler.history else {}
        try:
            return self._save(handler, handler.epoch, logs, path=target, synchronous=True,
                              batch=emergency.batches or None)
        except Exception as error:
            if emergency.reason == "exception" or self.config.on_save_error == "raise":
                raise
            self.failed_saves += 1
            handler.logger.error("EMERGENCY CHECKPOINT FAILED (%s: %s) in %s; %s",
                                 type(error).__name__, error, self.config.save_path,
                                 self.previous_checkpoint_note())
            return None

    # -- retention -----------------------------------------------------------------------------
    @property
    def retention_rules(self) -> RetentionRules:
        return RetentionRules.from_config(self.config)

    def _roll_back(self, previous: _Bookkeeping, plan: RetentionPlan | None) -> None:
        """Undo a failed save's bookkeeping and retention plan."""
        (self.last_saved_path, self.last_saved_epoch, self.save_count,
         self.pending_removal) = previous
        if plan is not None:
            self.retention.rollback(plan)

    def _commit_retention(self, handler: Trainer, plan: RetentionPlan) -> None:
        self.retention.commit(plan.after, self._guard(handler), self.state_key,
                              self.retention_rules)

    # -- StateProvider -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_state(),
            "last_saved_path": self.last_saved_path,
            "last_saved_epoch": self.last_saved_epoch,
            "save_count": self.save_count,
            "failed_saves": self.failed_saves,
            "pending_removal": self.pending_removal,
            "retention": self.retention.state_dict(),
            "schedule": self.schedule.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the bookkeeping; the configuration of this instance is kept as given.

        ``state`` is checked against :class:`AutoSaveStateRecord` first: a wrong type
        (``save_count: "x"``, ``pending_removal: 5``, ``retention.files[0].epoch: "abc"``) is a
        :class:`~nnhandler.CheckpointSchemaError` naming the field, and nothing changes. The
        recorded paths are only data: what ``train`` removes is confined by
        :mod:`nnhandler.checkpoint.removal`."""
        record = validate(AutoSaveStateRecord, state, where=f"state[{self.state_key!r}]")
        retention = None
        if record.retention is not None:  # checkpoints written before retention have none
            retention = Retention()
            retention.load_state_dict(record.retention.model_dump())
        self.last_saved_path = record.last_saved_path
        self.last_saved_epoch = record.last_saved_epoch
        self.save_count = record.save_count
        self.failed_saves = record.failed_saves
        self.pending_removal = record.pending_removal
        self.schedule.load_state_dict(None if record.schedule is None
                                      else record.schedule.model_dump())
        if retention is not None:
            self.retention.state, self.retention.continuing = retention.state, True
            self.retention.bind(self.state_key)


# restored on NNHandler.load through the same door as any third-party saver
register_provider_factory(AUTOSAVE_CLAIM, AutoSaveCallback.from_state)
