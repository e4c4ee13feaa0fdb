"""Finding the newest valid checkpoint in a directory — by recorded epoch, never by file time.

Candidates are ``*.pth`` files (ranked by their integrity record) and ``*.dcp`` sharded
checkpoint directories (ranked by their manifest); exported weights files (``export()``) are
not checkpoints and never candidates. A candidate is *valid* only when it would load: its
checksums match, its format version is one this nnhandler reads, and its content fits the
declared schema (:func:`check_candidate`, shared by ``load_latest``, ``train(resume="latest")``
and ``nnhandler list``/``verify``). A file that vanishes while the directory is read (another
job's retention removed it) is skipped, never reported as damaged.

Where the directory has a retention index (:mod:`.index`), a checkpoint it lists as kept wins
over another of the same epoch and step. Checkpoints the index does not list stay candidates:
a save by hand or by an auto-saver without ``keep_*`` rules in the same directory is never
passed over for an older indexed one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from ..errors import CheckpointError, CheckpointFormatError, CheckpointIndexError
from .content import check_contents
from .format import FORMAT_VERSION, Checkpoint, unpack
from .index import IndexSection, read_index
from .integrity import IntegrityRecord, read_integrity_record, verify_file
from .migrations import readable_version_problem
from .plainread import NeedsTorch, read_plain_envelope
from .sharded import (
    ENVELOPE_FILE,
    SHARDED_SUFFIX,
    files_directory,
    manifest_record,
    read_manifest,
    verify_sharded,
)
from .storage import URL, Store, location_of, store_for
from .writer import is_temp_file
from .ziplayout import check_zip_layout

__all__ = [
    "CheckpointCandidate",
    "check_candidate",
    "find_latest_valid",
    "first_valid",
    "list_checkpoints",
    "read_index_or_warn",
    "vanished",
    "verify_candidate",
]

CHECKPOINT_GLOB = "*.pth"


#: where a candidate lives: a local ``Path``, or a :class:`~.storage.URL`
Where = TypeVar("Where", Path, URL)


@dataclass(frozen=True)
class CheckpointCandidate(Generic[Where]):
    #: a local file or directory, or an object at a URL (:mod:`.remote_checkpoints`)
    path: Where
    record: IntegrityRecord | None
    problem: str | None
    #: the retention index records it for removal: no keep rule holds it any more
    superseded: bool = False
    #: the retention index lists it as kept
    indexed: bool = False

    @property
    def order(self) -> tuple[int, int, str]:
        record = self.record or IntegrityRecord()
        return (int(record.get("epoch", -1)), int(record.get("step", -1)),
                str(record.get("time", "")))

    @property
    def rank(self) -> tuple[bool, int, int, bool, str, str]:
        """Sort key, highest first: readable, epoch, step, kept by the index, save time, name."""
        epoch, step, time = self.order
        return (self.record is not None, epoch, step, self.indexed, time, self.path.name)


def read_index_or_warn(directory: str | Path, logger: logging.Logger,
                       store: Store | None = None) -> Mapping[str, IndexSection] | None:
    """The retention index of ``directory`` (``None`` when it has none); an unreadable one is
    a warning and ``None``. ``store``: the object store of a URL ``directory``."""
    try:
        return read_index(directory, store)
    except CheckpointIndexError as error:
        logger.warning("%s; ranking the checkpoints by their own records instead", error)
        return None


def list_checkpoints(directory: str | Path,
                     index: Mapping[str, IndexSection] | None = None
                     ) -> list[CheckpointCandidate[Path]]:
    """Every ``*.pth`` file and ``*.dcp`` directory in ``directory`` (temp files excluded) with
    its integrity record (read from the file's tail or the manifest), newest recorded epoch
    first; unreadable ones last, with the reason. ``index``: the directory's retention index
    (see the module docstring)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    kept = {entry.name for section in (index or {}).values() for entry in section.checkpoints}
    removing = {name for section in (index or {}).values() for name in section.removing}
    candidates = []
    for path in [*directory.glob(CHECKPOINT_GLOB), *directory.glob(f"*{SHARDED_SUFFIX}")]:
        if is_temp_file(path) or path.name.startswith("."):
            continue
        sharded = path.suffix == SHARDED_SUFFIX
        if not (path.is_dir() if sharded else path.is_file()):
            continue
        marks = {"indexed": path.name in kept,
                 "superseded": path.name in removing and path.name not in kept}
        try:
            record = manifest_record(path) if sharded else read_integrity_record(path)
        except (CheckpointError, OSError) as error:
            if vanished(path, error):
                continue
            candidates.append(CheckpointCandidate(path, None, str(error), **marks))
            continue
        if record.get("kind", "checkpoint") != "checkpoint":
            continue  # an export() weights file beside the checkpoints
        problem = _version_problem(path, record)
        candidates.append(CheckpointCandidate(path, None if problem else record, problem,
                                              **marks))
    return sorted(candidates, key=lambda c: c.rank, reverse=True)


def vanished(path: Path | URL, error: BaseException) -> bool:
    """Whether ``error`` only means that ``path`` was removed while it was being read."""
    if isinstance(path, URL):  # a store says so itself; there is nothing to look at here
        return isinstance(error, FileNotFoundError)
    return isinstance(error, FileNotFoundError) or not os.path.lexists(path)


def _version_problem(path: Path, record: IntegrityRecord) -> str | None:
    """Why a file of this format version would not load (``None`` when it would)."""
    version = record.get("format_version")
    if version is None:  # a sharded checkpoint's manifest: its envelope says, when checked
        return None
    return readable_version_problem(int(version), FORMAT_VERSION, repr(str(path)))


def verify_candidate(path: Path) -> IntegrityRecord:
    """Check a checkpoint file or sharded directory's checksums completely; returns its
    record. (:func:`check_candidate` also checks that it would load.)"""
    if path.is_dir():
        verify_sharded(path)
        return manifest_record(path)
    return verify_file(path)


def check_candidate(path: Path) -> IntegrityRecord:
    """Whether ``path`` would load: every checksum, the format version, and the content
    against the declared schema (tensors are mapped, not read). Returns its record; raises a
    :class:`~nnhandler.CheckpointError` subclass (or ``OSError``) saying what is wrong.

    Torch is imported only for a file :mod:`.plainread` does not decode itself: the content
    of the usual checkpoint is checked without it (``nnhandler verify`` starts fast)."""
    record = verify_candidate(path)
    envelope = (files_directory(path, read_manifest(path)) / ENVELOPE_FILE if path.is_dir()
                else path)
    checkpoint = _read_unverified(envelope)
    check_contents(checkpoint.state, str(path))
    # a directory is ranked by the records and loaded by the envelope: they must agree
    for key in ("epoch", "step"):
        if record.get(key) != checkpoint.meta[key]:
            raise CheckpointFormatError(
                f"{str(path)!r}: its integrity record says {key} {record.get(key)!r}, its "
                f"content {checkpoint.meta[key]!r}; it was altered")
    return record


def _read_unverified(path: Path) -> Checkpoint:
    """The envelope of ``path`` (checksums already checked) as ``read_checkpoint(verify=False,
    mmap=True)`` reads it, with :class:`~.plainread.TensorRef` for its tensors where
    :mod:`.plainread` can read it without torch."""
    if path.is_file():
        check_zip_layout(path)
        try:
            return unpack(path, read_plain_envelope(path))
        except NeedsTorch:
            pass  # torch.load decides, with its own words for what it refuses
    from .envelope import read_checkpoint

    return read_checkpoint(path, map_location="cpu", verify=False, mmap=True)


def first_valid(candidates: Iterable[CheckpointCandidate[Where]],
                check: Callable[[Where], object] = check_candidate,  # type: ignore[assignment]
                on_problem: Callable[[CheckpointCandidate[Where], str], None] | None = None,
                ) -> CheckpointCandidate[Where] | None:
    """The first candidate (in ranking order) that passes ``check``; files that vanish are
    skipped silently, other failures go to ``on_problem``."""
    for candidate in candidates:
        if candidate.record is None:
            continue
        try:
            check(candidate.path)
        except (CheckpointError, OSError) as error:
            if not vanished(candidate.path, error) and on_problem is not None:
                on_problem(candidate, str(error))
            continue
        return candidate
    return None


def find_latest_valid(directory: str | os.PathLike[str], logger: logging.Logger, *,
                      storage_options: Mapping[str, Any] | None = None) -> Path | URL | None:
    """The newest checkpoint in ``directory`` whose whole content verifies, or ``None``.

    Damaged or truncated files are skipped with a warning that says why. The retention index,
    where there is one, orders checkpoints of equal epoch and step (module docstring); an
    unreadable index is a warning. ``directory`` may be a URL (``storage_options`` for
    fsspec; :func:`~.remote_checkpoints.find_latest_valid_remote`).
    """
    location = location_of(directory)
    if isinstance(location, URL):
        from .remote_checkpoints import find_latest_valid_remote

        return find_latest_valid_remote(location, logger, storage_options)
    store_for(location, storage_options)  # local: options would be a mistake
    directory = location
    candidates = list_checkpoints(directory, read_index_or_warn(directory, logger))
    for candidate in candidates:
        # unreadable records come last in the ranking, but their epoch is unknown (often the
        # newest file, damaged): name each one even when an older valid file is chosen
        if candidate.record is None:
            logger.warning("skipping %s: %s", candidate.path, candidate.problem)
    chosen = first_valid(candidates, on_problem=lambda candidate, problem: logger.warning(
        "skipping %s: %s", candidate.path, problem))
    return None if chosen is None else chosen.path
