"""``auto_save(..., mirror="s3://bucket/run")``: local first, uploaded in the background.

The checkpoint is written into the local ``save_path`` exactly as without a mirror (the same
code path and speed). Once it is complete (and, with retention, once the local index records
it), rank 0 hands it to :class:`MirrorUploads`:

* a hard link to the file (a hidden temp name beside it, so local retention may remove the
  checkpoint meanwhile and a crash leaves only a stale temp file, removed at the next start)
  is queued (a name that holds another run's object goes to ``<stem>-v<N>.pth``, never
  replacing it); one non-daemon thread uploads the queue in order, one object at a time, each
  with one ``put_file`` (a PUT or a completed multipart upload: never a partial object), under
  the store's deadline and bounded retries (:class:`~nnhandler.checkpoint.remote.FsspecStore`).
  A checkpoint that completes while an upload runs waits for it (logged);
* after each upload the mirror gets the same retention as the local folder: the local index
  section, as it was when the checkpoint was queued, is written to the mirror's
  ``nnhandler-index.json`` (after the checkpoint it describes), then the objects that section
  no longer keeps (and, with ``overwrite``, the superseded one) are removed through
  :class:`~nnhandler.checkpoint.store_files.StoreRemovalGuard` (directly under the mirror, a
  name of the template, this run's lineage in its own record);
* a failure never stops training: it is reported at the next save or at the end of ``train``
  and follows ``on_save_error`` (``"warn"``: logged, the local checkpoint stands; ``"raise"``:
  raised on every rank). The end of ``train`` waits for the queue (each upload is bounded).

:func:`latest_with_mirror` is what ``train(resume="latest")`` picks: the newest valid
checkpoint of the local folder and of the mirror by recorded epoch, then step; the local one
wins a tie (:mod:`nnhandler.checkpoint.newest`, the rule ``NNHandler.load_latest(path,
mirror=URL)`` follows too).

When ``train`` starts after the local folder lost files (a new VM), retention completes its
bookkeeping from the mirror (:meth:`MirrorUploads.replica`, :meth:`~nnhandler.checkpoint.
retention.Retention.resume`): the mirror's index section of this lineage, only about files the
local folder lacks, and only files the mirror holds as this lineage's own, so the mirror keeps
what it would have kept had the folder survived.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint.index import IndexSection, read_index, update_index
from ..checkpoint.newest import newest_of_local_and_mirror
from ..checkpoint.storage import URL, store_for
from ..checkpoint.store_files import (
    StoreRemovalGuard,
    abort_stale_uploads,
    distinct_store_target,
)
from ..checkpoint.writer import temp_path_for
from ..distributed import run_on_rank_zero
from ..errors import CheckpointIndexError, ConfigurationError, RemoteStorageError

if TYPE_CHECKING:
    from ..checkpoint.remote import FsspecStore
    from ..config import AutoSaveConfig
    from ..distributed import DistributedContext
    from ..trainer import Trainer

__all__ = ["MirrorUploads", "latest_with_mirror"]


@dataclass(frozen=True)
class _Upload:
    """One queued upload: the local checkpoint, the link that keeps its bytes, the retention
    section the mirror gets after it, and the superseded names (``overwrite``)."""

    local: Path
    link: Path
    url: URL
    section: IndexSection | None
    superseded: tuple[str, ...]


class MirrorUploads:
    """The background uploads of one auto-saver to its ``mirror`` (module docstring)."""

    def __init__(self, source: Callable[[], tuple[AutoSaveConfig, str, tuple[str, ...]]]
                 ) -> None:
        #: the saver's configuration, state key and earlier name templates, now
        self._source = source
        self._queue: collections.deque[_Upload] = collections.deque()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._current: _Upload | None = None
        self._errors: list[tuple[URL, BaseException]] = []
        self._uploaded: set[str] = set()
        self._swept = False
        self._store: FsspecStore | None = None
        self._guard: StoreRemovalGuard | None = None
        self._key = ""
        #: uploads completed (in this process)
        self.uploads = 0

    @property
    def pending(self) -> int:
        """Uploads queued or running."""
        with self._lock:
            return len(self._queue) + (self._current is not None)

    def completed(self, handler: Trainer, path: Path | URL,
                  previous: tuple[str | None, int | None, int, str | None]) -> None:
        """Every rank, once the auto-save ``path`` is complete and its retention applied:
        rank 0 queues its upload (nothing without a ``mirror``). ``previous``: the saver's
        bookkeeping before it (with ``overwrite``, the auto-saves it replaced)."""
        config, state_key, earlier = self._source()
        if config.mirror is None:
            return
        if handler.sharded_checkpoints:  # every rank: the same error everywhere
            raise ConfigurationError(
                f"mirror={str(config.mirror)!r}: sharded checkpoints (a model with DTensor "
                "parameters) cannot be mirrored yet; use mirror=None")
        if not handler.distributed.is_main:
            return
        assert isinstance(path, Path)
        names = (tuple(Path(old).name for old in (previous[0], previous[3]) if old)
                 if config.overwrite else ())
        self.enqueue(handler, config, state_key, (config.name, *earlier), path, names)

    def replica(self, handler: Trainer, templates: tuple[str, ...] | None = None
                ) -> StoreRemovalGuard | None:
        """The guard of every removal on the mirror (``None`` without one): directly under
        it, the saver's name ``templates`` (default: its current and earlier ones), the run's
        lineage. Retention's resume reads the mirror through it too."""
        config, _, earlier = self._source()
        if config.mirror is None:
            return None
        store = store_for(config.mirror, config.storage_options)
        templates = (config.name, *earlier) if templates is None else templates
        return StoreRemovalGuard(config.mirror, templates[0], handler.progress.lineage,
                                 handler.logger, templates[1:], store=store)

    def enqueue(self, handler: Trainer, config: AutoSaveConfig, state_key: str,
                templates: tuple[str, ...], path: Path, superseded: tuple[str, ...] = ()
                ) -> None:
        """Rank 0, once ``path`` (a local checkpoint of this saver) is complete: queue its
        upload to ``config.mirror``."""
        mirror = config.mirror
        assert mirror is not None
        if path.is_dir():
            raise ConfigurationError(
                f"mirror={str(mirror)!r}: the sharded checkpoint {str(path)!r} cannot be "
                "mirrored yet; use mirror=None for a model with DTensor parameters")
        from ..checkpoint.remote import FsspecStore

        self._guard = guard = self.replica(handler, templates)
        assert guard is not None and isinstance(guard.store, FsspecStore)
        self._store, self._key = guard.store, state_key
        section = None
        try:
            section = (read_index(path.parent) or {}).get(state_key)
        except CheckpointIndexError as error:
            handler.logger.warning("mirror: %s; the mirror's index is not updated", error)
        link = temp_path_for(path)
        try:
            os.link(path, link)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(path, link)
        upload = _Upload(path, link, mirror / path.name, section, superseded)
        with self._lock:
            busy = self._current
            self._queue.append(upload)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, args=(handler.logger,),
                                                name="nnhandler-mirror-upload", daemon=False)
                self._thread.start()
        if busy is not None:
            handler.logger.info("mirror: the upload of %s waits for the upload of %s in "
                                "flight", upload.url, busy.url)

    # -- the upload thread ---------------------------------------------------------------------
    def _run(self, logger: logging.Logger) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._current = None
                    self._idle.notify_all()
                    return
                upload = self._current = self._queue.popleft()
            try:
                self._upload(upload, logger)
            except BaseException as error:  # kept for the training thread, never lost
                with self._lock:
                    self._errors.append((upload.url, error))
            finally:
                upload.link.unlink(missing_ok=True)

    def _upload(self, upload: _Upload, logger: logging.Logger) -> None:
        store, guard = self._store, self._guard
        assert store is not None and guard is not None
        mirror = upload.url.parent
        if not self._swept:  # a killed writer's incomplete uploads, once per process
            self._swept = True
            try:
                abort_stale_uploads(store, mirror, guard.templates, logger)
            except OSError as error:
                logger.warning("mirror: could not list the incomplete uploads in %s: %s",
                               mirror, error)
        size = upload.link.stat().st_size
        started = time.perf_counter()
        url = distinct_store_target(store, upload.url, guard.lineage)  # never another run's
        if url != upload.url:
            logger.warning("mirror: %s holds another run's checkpoint; uploading to %s",
                           upload.url, url)
        store.call("upload to", url, lambda: store.fs.put_file(str(upload.link), url.key),
                   store.settings.transfer_deadline(size))
        self._uploaded.add(url.name)
        self.uploads += 1
        logger.info("mirrored checkpoint %s (%.1f MB, %.2f s)", url, size / 1e6,
                    time.perf_counter() - started)
        candidates = set(upload.superseded)
        if upload.section is not None:
            before = (read_index(mirror, store) or {}).get(self._key)
            update_index(mirror, self._key, upload.section, store)  # after the checkpoint
            kept = {entry.name for entry in upload.section.checkpoints}
            if before is not None:
                candidates |= {entry.name for entry in before.checkpoints}
                candidates |= set(before.removing)
            candidates |= self._uploaded | set(upload.section.removing)
            candidates -= kept
        candidates -= {upload.url.name, url.name}
        for name in sorted(candidates):
            guard.remove(name, what="mirror retention: the object", in_directory=True)
            self._uploaded.discard(name)

    # -- reporting -----------------------------------------------------------------------------
    def report(self, handler: Trainer, *, wait: bool = False) -> None:
        """Collective: report the failed uploads (rank 0's) under ``on_save_error``;
        ``wait``: first wait until the queue is uploaded (the end of ``train``). Nothing
        without a ``mirror``."""
        config = self._source()[0]
        if config.mirror is None:
            return

        def collect() -> None:
            if wait:
                started = time.perf_counter()
                with self._lock:
                    waited = bool(self._queue) or self._current is not None
                    self._idle.wait_for(lambda: not self._queue and self._current is None)
                if waited:
                    handler.logger.info("mirror: waited %.2f s for the uploads to %s",
                                        time.perf_counter() - started, config.mirror)
            with self._lock:
                errors, self._errors = self._errors, []
            for url, error in errors:
                handler.logger.error(
                    "MIRROR UPLOAD FAILED for %s (%s: %s); the local checkpoint stands%s",
                    url, type(error).__name__, error,
                    "" if config.on_save_error == "raise" else " and training continues")
            if errors and config.on_save_error == "raise":  # the first failure, on every rank
                url, error = errors[0]
                if not isinstance(error, Exception) or str(url) in str(error):
                    raise error
                # a store's own error (s3fs' FileNotFoundError of a removed bucket) names no URL
                raise RemoteStorageError(f"mirror: the upload to {str(url)!r} failed: "
                                         f"{type(error).__name__}: {error}") from error

        run_on_rank_zero(handler.distributed, collect)


def latest_with_mirror(config: AutoSaveConfig, context: DistributedContext,
                       logger: logging.Logger) -> tuple[str | None, dict[str, Any] | None]:
    """``train(resume="latest")`` of a saver with a ``mirror``: the newest valid checkpoint
    of ``save_path`` and of the mirror
    (:func:`~nnhandler.checkpoint.newest.newest_of_local_and_mirror`: by recorded epoch, then
    step, the local one on a tie), with the ``storage_options`` to read it. Rank 0 chooses;
    every rank gets its choice."""
    mirror, local = config.mirror, config.save_path
    assert mirror is not None and isinstance(local, Path)

    def choose() -> str | None:
        found = newest_of_local_and_mirror(local, mirror, logger, config.storage_options)
        return None if found is None else str(found)

    chosen = run_on_rank_zero(context, choose)
    return chosen, (config.storage_options if chosen is not None
                    and chosen.startswith(f"{mirror.protocol}://") else None)
