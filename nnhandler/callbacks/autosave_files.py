"""The auto-saver's files: where a checkpoint goes (its name, a ``-v<N>`` name beside another
run's file), the directory it is prepared in, the free-space check, and which earlier files
are removed (``overwrite``) or kept (retention), always through a
:class:`~nnhandler.checkpoint.removal.RemovalGuard`.

Functions of the :class:`~nnhandler.callbacks.AutoSaveCallback` that take exactly what they
work on: its configuration, the trainer and the guard of its removals.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint.removal import RemovalGuard, distinct_target, remove_stale_temp_files
from ..checkpoint.retention import Retention, RetentionPlan, RetentionRules
from ..checkpoint.storage import URL, location_of, store_for
from ..config import AutoSaveConfig
from ..distributed import run_on_rank_zero
from ..errors import ConfigurationError
from ..naming import (
    MISSING_VALUE,
    LogSources,
    RenderedName,
    missing_key_reason,
    name_limit,
    render_name,
    template_fields,
)

if TYPE_CHECKING:
    from ..trainer import Trainer
    from .autosave_mirror import MirrorUploads

__all__ = [
    "check_log_keys",
    "estimated_size",
    "log_sources",
    "name_fields",
    "own_target",
    "plan_retention",
    "prepare_directory",
    "removal_guard",
    "remove_previous",
    "resume_retention",
    "save_through_seam",
    "warn_about_name",
    "warn_if_disk_is_short",
]


def removal_guard(config: AutoSaveConfig, handler: Trainer,
                  earlier_templates: tuple[str, ...]) -> RemovalGuard:
    """The confinement of an auto-saver's removals: its current folder and name template (and
    the ones it was configured with before), the run's lineage (see
    :mod:`nnhandler.checkpoint.removal`; for a URL, :mod:`nnhandler.checkpoint.store_files`)."""
    if isinstance(config.save_path, URL):
        from ..checkpoint.store_files import StoreRemovalGuard

        return StoreRemovalGuard(config.save_path, config.name, handler.progress.lineage,
                                 handler.logger, earlier_templates,
                                 store=store_for(config.save_path, config.save_path_options))
    return RemovalGuard(config.save_path, config.name, handler.progress.lineage,
                        handler.logger, earlier_templates)


def prepare_directory(config: AutoSaveConfig, handler: Trainer, guard: RemovalGuard, *,
                      last_saved_path: str | None, pending_removal: str | None) -> str | None:
    """Rank 0 when ``train`` starts: create and probe ``save_path``, remove stale temp
    files, finish the pending ``overwrite`` removal of this lineage; returns
    ``last_saved_path`` as it may stay recorded (``None`` with ``overwrite`` when it is no
    file this callback could ever remove). A URL: see
    :func:`~nnhandler.checkpoint.store_files.prepare_store_directory`."""
    directory = config.save_path
    if isinstance(directory, URL):
        from ..checkpoint.store_files import prepare_store_directory

        prepare_store_directory(guard.store, directory, guard.templates, handler.logger)
    else:
        _prepare_local_directory(directory, handler)
    pending, last = pending_removal, last_saved_path
    if not config.overwrite:
        return last
    if pending is not None and pending != last:
        # the checkpoint this run resumed from was written, its predecessor never removed
        remove_previous(handler, pending, location_of(last or pending), guard)
    reason = None if last is None else guard.refusal(last)
    if reason is not None:
        handler.logger.warning(
            "overwrite: the previous auto-save %r recorded in the checkpoint is dropped from "
            "the bookkeeping and will not be removed: %s", last, reason)
        return None
    return last


def _prepare_local_directory(directory: Path, handler: Trainer) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".nnhandler-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigurationError(
            f"auto-save cannot write to save_path {str(directory)!r}: {error}"
        ) from error
    name_limit(directory)  # a filesystem too short for checkpoint names fails here
    for stale in remove_stale_temp_files(directory, handler.logger):
        handler.logger.warning("removed temp file %s left by an interrupted save", stale)


def log_sources(handler: Trainer) -> LogSources:
    """What the training loop of ``handler``'s running call logs."""
    return LogSources(metrics=tuple(handler.metrics), validates="val" in handler.loaders,
                      validate_every=handler.settings.validate_every)


def name_fields(handler: Trainer, epoch: int, logs: dict[str, Any],
                epoch_batches: int | None) -> dict[str, Any]:
    """What an end-of-epoch name is rendered from: the epoch's logs, ``epoch``, ``step`` (the
    global optimizer step) and ``batch`` (the epoch's batches, where known: from the step
    events). A key a callback logged under ``step`` or ``batch`` wins."""
    fields = {"step": handler.global_step, "batch": epoch_batches, **logs, "epoch": epoch}
    return {key: value for key, value in fields.items() if value is not None}


def check_log_keys(config: AutoSaveConfig, handler: Trainer, retention: Retention,
                   epoch: int, logs: dict[str, Any], reported: set[str]) -> None:
    """At the end of a call's first epoch (the logs are final: callbacks have added their
    keys): say once why a key of the name template, or the ``keep_best`` monitor, is missing
    when no epoch of this configuration will have it (see :mod:`nnhandler.naming`). The
    template keys said are added to ``reported``. ``logs``: as :func:`name_fields` gives
    them."""
    keys = [key for key in dict.fromkeys(template_fields(config.name))
            if key not in logs and key not in reported]
    monitor = config.monitor
    if config.keep_best is None or monitor is None or monitor in logs:
        monitor = None
    if not keys and monitor is None:
        return
    sources = log_sources(handler)
    for key in keys:
        missing = missing_key_reason(key, sources, epoch, logs)
        if missing.every_epoch:
            reported.add(key)
            handler.logger.warning(
                "auto-save name template %r: key %r is missing from the epoch-%d logs: %s; "
                "checkpoint names will have %s in its place, such as %s (said once)",
                config.name, key, epoch, missing.reason, MISSING_VALUE,
                render_name(config.name, logs).name)
    if monitor is not None:
        missing = missing_key_reason(monitor, sources, epoch, logs)
        if missing.every_epoch and handler.distributed.is_main:
            retention.notice_not_a_candidate(monitor, logs, epoch, handler.logger,
                                             reason=missing.reason)


def warn_about_name(config: AutoSaveConfig, handler: Trainer, rendered: RenderedName,
                    epoch: int, logs: dict[str, Any], path: Path | URL, reported: set[str], *,
                    mid_epoch: bool = False) -> None:
    """Say why the name template's keys are missing from the logs (a warning for each key the
    first time, debug level after; ``reported`` holds the keys said), and when the name was
    clipped to the filesystem's limit.

    ``mid_epoch``: a save inside an epoch, whose logs (:meth:`~nnhandler.loop.MidEpoch.logs`)
    lack by nature what exists only at an epoch's end (``val_*``, keys callbacks add there):
    its missing keys are logged at debug level only; a key that no epoch has either is
    explained once at the first epoch's end (:func:`check_log_keys`)."""
    fresh = [key for key in rendered.missing if key not in reported]
    if mid_epoch and rendered.missing:
        handler.logger.debug(
            "auto-save name template %r: key(s) %s missing from the mid-epoch logs (keys: %s; "
            "val_* and keys callbacks add exist at an epoch's end only); saving as %s",
            config.name, ", ".join(rendered.missing), ", ".join(logs), path.name)
    elif fresh:
        sources = log_sources(handler)
        reasons = "; ".join(
            f"{key!r}: {missing_key_reason(key, sources, epoch, logs).reason}" for key in fresh)
        handler.logger.warning(
            "auto-save name template %r: key(s) %s missing from the epoch-%d logs (%s); "
            "saving as %s with %s in their place (said once per key; later ones are logged "
            "at debug level)", config.name, ", ".join(fresh), epoch, reasons, path.name,
            MISSING_VALUE,
        )
        reported.update(fresh)
    elif rendered.missing:
        handler.logger.debug(
            "auto-save name template %r: key(s) %s missing from the epoch-%d logs; saving as "
            "%s", config.name, ", ".join(rendered.missing), epoch, path.name)
    if rendered.clipped_from is not None:
        handler.logger.warning(
            "auto-save name template %r gave a file name of %d bytes for epoch %d, longer "
            "than names in %s may be (%d bytes); saving as %s (its start and a hash of the "
            "full name %.300r)", config.name, len(rendered.clipped_from.encode()), epoch,
            config.save_path, name_limit(config.save_path), path.name,
            rendered.clipped_from,
        )


def own_target(handler: Trainer, path: Path | URL, *, warn: bool,
               storage_options: dict[str, Any] | None = None) -> Path | URL:
    """``path``, or ``<stem>-v<N><suffix>`` when ``path`` holds another run's file (or
    anything that is not this lineage's checkpoint): never replace what another run wrote.
    Rank 0 decides, every rank takes its answer; ``warn``: say so (rank 0) when it differs."""
    lineage = handler.progress.lineage

    def choose() -> str:
        if isinstance(path, URL):
            from ..checkpoint.store_files import distinct_store_target

            return distinct_store_target(store_for(path, storage_options), path, lineage)
        return str(distinct_target(path, lineage))

    chosen = location_of(run_on_rank_zero(handler.distributed, choose))
    if chosen != path and warn and handler.distributed.is_main:
        handler.logger.warning(
            "auto-save: %s exists and is not this run's checkpoint (another run, or "
            "not a checkpoint of this lineage); it is left untouched and this run "
            "saves as %s instead (later names taken alike get -v<N> too, said once). "
            "To avoid this use another save_path or name, continue that run with "
            "train(resume=\"latest\"), or remove the old files", path, chosen.name)
    return chosen


def warn_if_disk_is_short(config: AutoSaveConfig, handler: Trainer,
                          last_size: int | None) -> None:
    """Warn when ``save_path`` has less than twice the expected checkpoint size free (the
    last checkpoint's size, or :func:`estimated_size` before the first)."""
    directory = config.save_path
    if isinstance(directory, URL):  # object stores do not run out of space
        return
    expected = last_size or estimated_size(handler)
    try:
        free = shutil.disk_usage(directory if directory.exists() else Path.cwd()).free
    except OSError:
        return
    if free < 2 * expected:
        handler.logger.warning(
            "only %.1f MB free in %s, less than twice the expected checkpoint size "
            "(%.1f MB): the next saves may fail", free / 1e6, directory, expected / 1e6,
        )


def estimated_size(handler: Trainer) -> int:
    """A first save's size before any file exists: model tensors, three times over (weights
    plus typical optimizer moments)."""
    tensors = handler.module.state_dict().values()
    return int(3 * sum(t.numel() * t.element_size() for t in tensors))


def remove_previous(handler: Trainer, previous: str, new: Path | URL,
                    guard: RemovalGuard) -> None:
    """Rank 0, ``overwrite``: remove the recorded previous auto-save ``previous`` (unless
    it is ``new``), through ``guard``: a value that is not this callback's own file is
    left alone with a warning."""
    if not handler.distributed.is_main:
        return
    if isinstance(new, URL):
        if previous == new:
            return
    elif os.path.realpath(previous) == os.path.realpath(new):
        return
    guard.remove(previous, what="overwrite: the previous auto-save")


def save_through_seam(handler: Trainer, path: Path | URL, logs: dict[str, Any],
                      storage_options: dict[str, Any] | None) -> None:
    """``handler.checkpoints.save(path, logs)``; ``storage_options`` only where given (a URL),
    so that a seam without the keyword still serves local auto-saves."""
    extra = {"storage_options": storage_options} if storage_options else {}
    handler.checkpoints.save(path, logs, **extra)


def remove_superseded(handler: Trainer, superseded: list[str], new: Path | URL,
                      guard: RemovalGuard) -> None:
    """:func:`remove_previous` for each of ``superseded`` (after a background write)."""
    for old in superseded:
        remove_previous(handler, old, new, guard)


def resume_retention(retention: Retention, rules: RetentionRules, key: str, handler: Trainer,
                     guard: RemovalGuard, mirror: MirrorUploads | None = None) -> None:
    """When ``train`` starts: rank 0 merges the restored bookkeeping with the index (records
    ``guard`` refuses are dropped) and, with a ``mirror``, with the mirror's where the local
    folder lost files (:meth:`~nnhandler.checkpoint.retention.Retention.resume`); every rank
    takes the result, and rank 0 records it and finishes removals already decided."""
    if not rules.active:
        return
    retention.bind(key)
    merged = run_on_rank_zero(handler.distributed, lambda: retention.resume(
        guard, key, None if mirror is None else mirror.replica(handler)))
    retention.state = merged
    if handler.distributed.is_main and (merged.files or merged.removing):
        retention.commit(merged, guard, key, rules)


def plan_retention(retention: Retention, rules: RetentionRules, key: str, handler: Trainer,
                   path: Path | URL, epoch: int, logs: dict[str, Any], *,
                   partial: bool, batch: int | None = None) -> RetentionPlan | None:
    """The retention plan of saving ``path`` (``None`` without retention rules); ``batch``:
    written inside the epoch after ``epoch``, after that many batches."""
    if not rules.active:
        return None
    retention.bind(key)
    def why_missing(key: str) -> str:
        return missing_key_reason(key, log_sources(handler), epoch, logs).reason

    return retention.plan(rules, path.name, epoch, handler.global_step, logs,
                          lineage=handler.progress.lineage,
                          is_main=handler.distributed.is_main, logger=handler.logger,
                          partial=partial, batch=batch, why_missing=why_missing)
