"""An auto-saver's files in object storage: the rules of :mod:`.removal`, over a
:class:`~.storage.Store`.

An auto-save to a URL (``save_path="s3://bucket/run"``) keeps every local guarantee:

* :class:`StoreRemovalGuard` is the one door for its removals (``overwrite``, retention, the
  index's ``removing``), with the same checks as :class:`~.removal.RemovalGuard`: the object
  lies *directly* under the callback's current prefix (a recorded URL elsewhere, a relative
  path, ``..``, a name with ``/`` are refused), its name is one the callback writes, it is no
  "folder" (a prefix with objects under it) and the lineage in its own integrity record (one
  ranged read) is the run's. Object stores have no symbolic links to refuse;
* :func:`distinct_store_target`: a name that holds another run's object (or one recording
  no lineage) is never replaced; the save goes to ``<stem>-v<N>.pth``;
* :func:`prepare_store_directory` (when ``train`` starts, rank 0): a probe object is written
  and removed (an unwritable bucket is a :class:`~nnhandler.ConfigurationError` before any
  epoch), and multipart uploads that a killed writer left incomplete under the prefix are
  aborted — the object store's stale temp files. Only uploads of this callback's names,
  initiated before this process started, are aborted (each one is named in a warning); on a
  store without multipart uploads (or without a way to list them) there is nothing to do.
  Sharded ``.dcp`` prefixes that an interrupted save left without a manifest are named in a
  warning (:func:`report_incomplete_sharded`); the next save of that name removes them.

A sharded checkpoint is a prefix (``NAME.dcp/``, :mod:`.remote_sharded`): the guard takes it
when its name ends in ``.dcp``, with the lineage its manifest records, and removes its
manifest first.

Nothing here raises into training except the probe: a failed removal is a warning and the
name stays recorded, as locally.
"""

from __future__ import annotations

import functools
import logging
import os
from datetime import datetime, timezone
from typing import Any, Final

from ..errors import CheckpointError, ConfigurationError
from .removal import (
    LINEAGE_FIELD,
    MAX_VERSION,
    Outcome,
    Refused,
    RemovalGuard,
    is_own_name,
    require_own_lineage,
)
from .sharded import SHARDED_SUFFIX
from .storage import PROCESS_STARTED, URL, Store, is_url

__all__ = ["StoreRemovalGuard", "abort_stale_uploads", "distinct_store_target",
           "prepare_store_directory", "report_incomplete_sharded", "store_lineage",
           "versioned_url"]

_PROBE: Final = ".nnhandler-write-probe-"


def store_lineage(store: Store, url: URL) -> str | None:
    """The lineage the checkpoint object ``url`` records about itself (its integrity record);
    ``None`` when it records none, is no checkpoint or cannot be read."""
    from .remote_checkpoints import remote_integrity_record

    if url.name.endswith(SHARDED_SUFFIX):  # a prefix: its manifest records the lineage
        from .remote_sharded import remote_lineage

        return remote_lineage(store, url)
    try:
        record = remote_integrity_record(store, url)
    except (CheckpointError, OSError):
        return None
    value = record.get(LINEAGE_FIELD)
    return value if isinstance(value, str) and value else None


def versioned_url(url: URL, number: int) -> URL:
    """``url`` with the collision suffix: ``…/ep001.pth`` → ``…/ep001-v2.pth``."""
    suffix = SHARDED_SUFFIX if url.name.endswith(SHARDED_SUFFIX) else ".pth"
    return url.parent / f"{url.name.removesuffix(suffix)}-v{number}{suffix}"


def distinct_store_target(store: Store, url: URL, lineage: str) -> URL:
    """:func:`~.removal.distinct_target` for an object: ``url`` when it is free or this
    lineage's own checkpoint, else the first free or own ``-v<N>`` name."""
    def owned_or_free(candidate: URL) -> bool:
        return (not store.exists(candidate)
                or (bool(lineage) and store_lineage(store, candidate) == lineage)
                or _sharded_leftover(store, candidate))

    if owned_or_free(url):
        return url
    for number in range(1, MAX_VERSION + 1):
        candidate = versioned_url(url, number)
        if owned_or_free(candidate):
            return candidate
    raise CheckpointError(
        f"{str(url)!r} and its -v1 … -v{MAX_VERSION} variants all belong to other runs; "
        "use another save_path or name")


def _sharded_leftover(store: Store, url: URL) -> bool:
    """An interrupted sharded save's prefix (no manifest, generation folders only): no
    checkpoint of anyone's, so a save of that name may go there (and removes it)."""
    from .remote_sharded import is_leftover

    return url.name.endswith(SHARDED_SUFFIX) and is_leftover(store, url)


class StoreRemovalGuard(RemovalGuard):
    """:class:`~.removal.RemovalGuard` for a callback whose ``save_path`` is a URL (see the
    module docstring); the same interface, so retention and ``overwrite`` use either."""

    def __init__(self, directory: URL, template: str, lineage: str, logger: logging.Logger,
                 earlier_templates: tuple[str, ...] = (), *, store: Store) -> None:
        # not RemovalGuard.__init__: Path(directory) would fold "s3://" into "s3:/"
        self.directory = directory  # type: ignore[assignment]
        self.template = template
        self.templates = (template, *(t for t in earlier_templates if t != template))
        self.lineage = lineage
        self.logger = logger
        self.store = store

    def locate(self, recorded: str, *, in_directory: bool = False) -> URL | None:  # type: ignore[override]
        if not isinstance(recorded, str) or not recorded:
            raise Refused("not a file name")
        folder: URL = self.directory  # type: ignore[assignment]
        if is_url(recorded):
            try:
                candidate = URL(recorded)
            except ConfigurationError as error:
                raise Refused(str(error)) from None
        elif in_directory and "/" not in recorded and "\\" not in recorded:
            if recorded in (".", ".."):
                raise Refused("not a file name")
            candidate = folder / recorded
        else:
            raise Refused(f"not directly inside save_path {str(folder)!r}")
        name = candidate.name
        if name in ("", ".", "..") or candidate.parent != folder or candidate == folder:
            raise Refused(f"not directly inside save_path {str(folder)!r}")
        if not self.store.exists(candidate):
            return None
        if not any(is_own_name(name, template) for template in self.templates):
            raise Refused(f"its name does not match the name template {self.template!r}")
        if self.store.is_dir(candidate) and not name.endswith(SHARDED_SUFFIX):
            raise Refused("a prefix with objects under it (a folder), not one checkpoint "
                           "object (only sharded .dcp checkpoints are prefixes)")
        require_own_lineage(store_lineage(self.store, candidate), self.lineage)
        return candidate

    def remove(self, recorded: str, *, what: str, in_directory: bool = False) -> Outcome:
        try:
            target = self.locate(recorded, in_directory=in_directory)
        except Refused as refused:
            self.logger.warning("%s %r is not removed and is dropped from the bookkeeping: %s",
                                what, recorded, refused)
            return Outcome.REFUSED
        except OSError as error:  # the store did not answer the checks: try again later
            self.logger.warning("%s: could not check %s: %s", what, recorded, error)
            return Outcome.FAILED
        if target is None:
            return Outcome.GONE
        try:
            if target.name.endswith(SHARDED_SUFFIX):
                from .remote_sharded import remove_remote_sharded

                remove_remote_sharded(self.store, target)  # its manifest first
            else:
                self.store.remove(target)
        except OSError as error:
            self.logger.warning("%s: could not remove %s: %s", what, target, error)
            return Outcome.FAILED
        return Outcome.REMOVED

    def exists(self, name: str) -> bool:
        return self.store.exists(self.directory / name)


def prepare_store_directory(store: Store, directory: URL, templates: tuple[str, ...],
                            logger: logging.Logger) -> list[str]:
    """Rank 0 when ``train`` starts: check that ``directory`` takes writes (a
    :class:`~nnhandler.ConfigurationError` naming it otherwise) and abort the stale multipart
    uploads of ``templates``' names under it; returns the keys aborted."""
    probe = directory / f"{_PROBE}{os.getpid()}"
    try:
        store.put_bytes(probe, b"")
        store.remove(probe)
    except OSError as error:
        raise ConfigurationError(
            f"auto-save cannot write to save_path {str(directory)!r}: {error}") from error
    report_incomplete_sharded(store, directory, templates, logger)
    return abort_stale_uploads(store, directory, templates, logger)


def report_incomplete_sharded(store: Store, directory: URL, templates: tuple[str, ...],
                              logger: logging.Logger) -> list[URL]:
    """Name, in a warning each, the prefixes of ``templates``' sharded names under
    ``directory`` that an interrupted save left without a manifest (never loaded; the next
    save of that name removes them); returns them."""
    from .remote_sharded import is_leftover

    found = []
    for entry in store.entries(directory):
        url = entry.location
        assert isinstance(url, URL)
        if not (entry.is_dir and url.name.endswith(SHARDED_SUFFIX)
                and any(is_own_name(url.name, template) for template in templates)):
            continue
        if is_leftover(store, url):
            logger.warning("%s holds the files of an interrupted sharded save and no "
                           "manifest: it is no checkpoint and is never loaded; the next save "
                           "of that name removes it", url)
            found.append(url)
    return found


def abort_stale_uploads(store: Store, directory: URL, templates: tuple[str, ...],
                        logger: logging.Logger,
                        before: datetime = PROCESS_STARTED) -> list[str]:
    """Abort the incomplete multipart uploads directly under ``directory`` whose names
    ``templates`` write and that began ``before`` (default: when this process started; see
    the module docstring); returns their keys. A store without listable uploads has none."""
    from .remote import FsspecStore

    if not isinstance(store, FsspecStore):
        return []
    lister = getattr(store.fs, "list_multipart_uploads", None)  # s3fs has them
    aborter = getattr(store.fs, "abort_mpu", None)
    if lister is None or aborter is None:
        return []
    bucket, _, prefix = directory.key.partition("/")
    prefix = f"{prefix}/" if prefix else ""

    def stale() -> list[dict[str, Any]]:
        return [upload for upload in lister(bucket)
                if _is_stale(upload, prefix, templates, before)]

    aborted = []
    for upload in store.call("listing of the multipart uploads in", directory, stale):
        key, upload_id = str(upload["Key"]), str(upload["UploadId"])
        url = URL(f"{directory.protocol}://{bucket}/{key}")
        try:
            store.call("abort of the upload to", url,
                       functools.partial(aborter, bucket, key, upload_id))
        except OSError as error:
            logger.warning("could not abort the incomplete upload %s (%s): %s", url,
                           upload_id, error)
            continue
        logger.warning("aborted the incomplete upload to %s (begun %s) left by an "
                       "interrupted save", url, upload.get("Initiated"))
        aborted.append(key)
    return aborted


def _is_stale(upload: dict[str, Any], prefix: str, templates: tuple[str, ...],
              before: datetime) -> bool:
    key = str(upload.get("Key", ""))
    if not key.startswith(prefix) or "/" in key[len(prefix):]:
        return False
    if not any(is_own_name(key[len(prefix):], template) for template in templates):
        return False
    initiated = upload.get("Initiated")
    if not isinstance(initiated, datetime):
        return False
    if initiated.tzinfo is None:
        initiated = initiated.replace(tzinfo=timezone.utc)
    return initiated < before
