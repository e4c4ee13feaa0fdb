"""Checkpoints at URLs: write, read, list and choose, through a :class:`~.storage.Store`.

The same files and the same rules as on a local disk, on a store without rename:

* :func:`publish_checkpoint` writes the file locally (CRC-32 computed as it is written) and
  publishes it whole (:meth:`~.remote.FsspecStore.publish`): nothing partial is ever listed;
* :func:`read_remote_checkpoint` reads a complete copy and always verifies its CRC-32 (the
  object may have been replaced since it was chosen);
* :func:`list_remote_checkpoints` ranks a folder's ``*.pth`` objects by the integrity record
  at each one's end (one ranged read per object) and its ``*.dcp`` prefixes by their
  manifest (:mod:`.remote_sharded`; one without is listed as incomplete), as
  :func:`~.discovery.list_checkpoints` does locally; :func:`find_latest_valid_remote` takes
  the newest that would load.

Errors name the URL, never the local staging copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from ..errors import CheckpointError, ConfigurationError
from .discovery import CheckpointCandidate, check_candidate, first_valid, read_index_or_warn
from .format import Checkpoint
from .index import INDEX_FILE, IndexSection
from .integrity import TAIL_PREFETCH, IntegrityRecord, parse_integrity_record
from .remote_sharded import complete_copy, remote_manifest_record
from .sharded import SHARDED_SUFFIX
from .storage import URL, Store, store_for
from .writer import Destination, is_temp_file

__all__ = ["check_remote_candidate", "find_latest_valid_remote", "list_remote_checkpoints",
           "named_as", "publish_checkpoint", "read_remote_checkpoint", "remote_integrity_record"]

Result = TypeVar("Result")


def publish_checkpoint(url: URL, write: Callable[[Destination], int],
                       storage_options: Mapping[str, Any] | None = None) -> int:
    """Write a checkpoint to ``url``: ``write(destination)`` writes it (with its integrity
    record) to a staging file or into a streaming upload, which is published whole. Returns
    its size."""
    if url.suffix == SHARDED_SUFFIX:
        raise ConfigurationError(
            f"save path {str(url)!r}: {SHARDED_SUFFIX!r} names a sharded checkpoint directory, "
            "but this model has no DTensor parameters; use '.pth'")
    return store_for(url, storage_options).publish(url, write)


@contextmanager
def named_as(url: URL, local: Path) -> Iterator[None]:
    """Errors raised about ``local`` (a staging copy) name ``url`` instead (a sharded
    checkpoint's files too: ``local/name`` becomes ``url/name``)."""
    try:
        yield
    except (CheckpointError, OSError) as error:
        text = str(local)
        if error.args and isinstance(error.args[0], str) and text in error.args[0]:
            error.args = (error.args[0].replace(text, str(url)), *error.args[1:])
        if getattr(error, "path", None) == text:
            error.path = str(url)  # type: ignore[union-attr]
        raise


def read_remote_checkpoint(url: URL, map_location: Any = None, *,
                           storage_options: Mapping[str, Any] | None = None) -> Checkpoint:
    """Read the checkpoint at ``url`` (a complete copy, verified against its CRC-32 while it
    is read); its ``path`` is ``url``."""
    store = store_for(url, storage_options)
    try:
        with store.fetch(url) as local, named_as(url, local):
            from .envelope import read_checkpoint  # torch: not for list/verify

            checkpoint = read_checkpoint(local, map_location, verify=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {str(url)!r} does not exist") from error
    # ``path`` is typed Path for the local readers; for a URL it holds the URL (a str)
    return replace(checkpoint, path=url)  # type: ignore[arg-type]


def remote_integrity_record(store: Store, url: URL) -> IntegrityRecord:
    """The integrity record at the end of the object ``url`` (usually one ranged read)."""
    size, tail = store.read_tail(url, TAIL_PREFETCH)

    def read_tail(length: int) -> bytes:
        nonlocal tail
        if length > len(tail) and len(tail) < size:
            size_now, tail = store.read_tail(url, length)
            if size_now != size:
                raise CheckpointError(f"{str(url)!r} changed while its record was read")
        return tail[len(tail) - length:]

    return parse_integrity_record(read_tail, size, str(url))


def list_remote_checkpoints(store: Store, directory: URL,
                            index: Mapping[str, IndexSection] | None = None,
                            ) -> list[CheckpointCandidate[URL]]:
    """Every ``*.pth`` object directly in ``directory`` with its integrity record, newest
    recorded epoch first, unreadable ones last with the reason (exported weights skipped).
    ``index``: the folder's retention index, as :func:`~.discovery.list_checkpoints` takes it."""
    kept = {entry.name for section in (index or {}).values() for entry in section.checkpoints}
    removing = {name for section in (index or {}).values() for name in section.removing}
    candidates: list[CheckpointCandidate[URL]] = []
    for entry in store.entries(directory):
        url = entry.location
        assert isinstance(url, URL)
        sharded = entry.is_dir and url.suffix == SHARDED_SUFFIX  # a prefix with a manifest
        if (entry.is_dir and not sharded) or url.suffix not in (".pth", SHARDED_SUFFIX) \
                or url.name.startswith(".") or is_temp_file(Path(url.name)) \
                or url.name == INDEX_FILE:
            continue
        marks = {"indexed": url.name in kept,
                 "superseded": url.name in removing and url.name not in kept}
        try:
            record = (remote_manifest_record(store, url) if sharded
                      else remote_integrity_record(store, url))
        except FileNotFoundError:
            continue  # removed meanwhile
        except (CheckpointError, OSError) as error:
            candidates.append(CheckpointCandidate(url, None, str(error), **marks))
            continue
        if record.get("kind", "checkpoint") != "checkpoint":
            continue
        candidates.append(CheckpointCandidate(url, record, None, **marks))
    return sorted(candidates, key=lambda c: c.rank, reverse=True)


def check_remote_candidate(store: Store, url: URL) -> IntegrityRecord:
    """Whether the object ``url`` would load (every checksum, format version, content
    schema: :func:`~.discovery.check_candidate` on a complete copy); returns its record.
    A sharded checkpoint (``….dcp``) is copied file by file
    (:func:`~.remote_sharded.complete_copy`)."""
    with complete_copy(store, url) as local, named_as(url, local):
        return check_candidate(local)


def find_latest_valid_remote(directory: URL, logger: logging.Logger,
                             storage_options: Mapping[str, Any] | None = None) -> URL | None:
    """The newest checkpoint in ``directory`` that would load, or ``None``; damaged ones are
    skipped with a warning that says why."""
    store = store_for(directory, storage_options)
    candidates = list_remote_checkpoints(store, directory,
                                         read_index_or_warn(directory, logger, store))
    for candidate in candidates:
        if candidate.record is None:
            logger.warning("skipping %s: %s", candidate.path, candidate.problem)
    chosen = first_valid(
        candidates, check=lambda url: check_remote_candidate(store, url),
        on_problem=lambda candidate, problem: logger.warning("skipping %s: %s",
                                                             candidate.path, problem))
    if chosen is None:
        return None
    return chosen.path
