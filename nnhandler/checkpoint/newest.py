"""The newest valid checkpoint of a local folder and its mirror: the one rule that
``train(resume="latest")`` of an auto-saver with a ``mirror`` and
``NNHandler.load_latest(path, mirror=URL)`` share.

Each side is searched as it is alone (:func:`~.discovery.find_latest_valid`,
:func:`~.remote_checkpoints.find_latest_valid_remote`): damaged, truncated or off-schema
checkpoints are skipped with a warning, so the choice falls back past corrupt ones on either
side. Of the two found, the higher recorded (epoch, step) wins; the local one wins a tie (it
needs no download). A mirror that does not answer is a warning and the local folder is taken
alone; a local folder that does not exist (the disk was lost) has no candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .discovery import find_latest_valid
from .integrity import IntegrityRecord, read_integrity_record
from .remote_checkpoints import find_latest_valid_remote, remote_integrity_record
from .storage import URL, store_for

__all__ = ["newest_of_local_and_mirror"]


def newest_of_local_and_mirror(local: Path, mirror: URL, logger: logging.Logger,
                               storage_options: Mapping[str, Any] | None = None
                               ) -> Path | URL | None:
    """The newest valid checkpoint of the folder ``local`` and of ``mirror`` (module
    docstring), ``None`` when neither has one. ``storage_options``: fsspec's options for
    ``mirror`` (the local folder takes none)."""
    found = find_latest_valid(local, logger)
    assert found is None or isinstance(found, Path)
    try:
        remote = find_latest_valid_remote(mirror, logger, storage_options)
    except OSError as error:
        logger.warning("the mirror %s did not answer (%s); looking at %s only", mirror, error,
                       local)
        remote = None
    if remote is None or found is None:
        return found if remote is None else remote
    mine = _order(lambda: read_integrity_record(found))
    theirs = _order(lambda: remote_integrity_record(
        store_for(mirror, storage_options), remote))
    if mine is None or theirs is None:  # one changed since it was chosen: the other stands
        return remote if mine is None and theirs is not None else found
    return remote if theirs > mine else found


def _order(read: Callable[[], IntegrityRecord]) -> tuple[int, int] | None:
    """(epoch, step) of the record ``read()`` returns; ``None`` when it cannot be read."""
    try:
        record = read()
    except (CheckpointError, OSError):
        return None
    return int(record.get("epoch", -1)), int(record.get("step", -1))
