"""Finding the newest valid checkpoint in a directory — by recorded epoch, never by file time.

Candidates are ``*.pth`` files (ranked by their integrity record) and ``*.dcp`` sharded
checkpoint directories (ranked by their manifest). Where the directory has a retention index
(:mod:`.index`), a checkpoint it lists as kept wins over another of the same epoch and step.
Checkpoints the index does not list stay candidates: a save by hand or by an auto-saver
without ``keep_*`` rules in the same directory is never passed over for an older indexed one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, CheckpointIndexError
from .index import IndexSection, read_index
from .integrity import IntegrityRecord, read_integrity_record, verify_file
from .sharded import SHARDED_SUFFIX, manifest_record, verify_sharded
from .writer import is_temp_file

__all__ = ["CheckpointCandidate", "find_latest_valid", "list_checkpoints", "read_index_or_warn",
           "verify_candidate"]

CHECKPOINT_GLOB = "*.pth"


@dataclass(frozen=True)
class CheckpointCandidate:
    path: Path
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


def read_index_or_warn(directory: str | Path,
                       logger: logging.Logger) -> Mapping[str, IndexSection] | None:
    """The retention index of ``directory`` (``None`` when it has none); an unreadable one is
    a warning and ``None``."""
    try:
        return read_index(directory)
    except CheckpointIndexError as error:
        logger.warning("%s; ranking the checkpoints by their own records instead", error)
        return None


def list_checkpoints(directory: str | Path,
                     index: Mapping[str, IndexSection] | None = None) -> list[CheckpointCandidate]:
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
            candidates.append(CheckpointCandidate(path, record, None, **marks))
        except (CheckpointError, OSError) as error:
            candidates.append(CheckpointCandidate(path, None, str(error), **marks))
    return sorted(candidates, key=lambda c: c.rank, reverse=True)


def verify_candidate(path: Path) -> IntegrityRecord:
    """Check a checkpoint file or sharded directory completely; returns its record."""
    if path.is_dir():
        verify_sharded(path)
        return manifest_record(path)
    return verify_file(path)


def find_latest_valid(directory: str | Path, logger: logging.Logger) -> Path | None:
    """The newest checkpoint in ``directory`` whose whole content verifies, or ``None``.

    Damaged or truncated files are skipped with a warning that says why. The retention index,
    where there is one, orders checkpoints of equal epoch and step (module docstring); an
    unreadable index is a warning.
    """
    candidates = list_checkpoints(directory, read_index_or_warn(directory, logger))
    for candidate in candidates:
        # unreadable records come last in the ranking, but their epoch is unknown (often the
        # newest file, damaged): name each one even when an older valid file is chosen
        if candidate.record is None:
            logger.warning("skipping %s: %s", candidate.path, candidate.problem)
    for candidate in candidates:
        if candidate.record is None:
            continue
        try:
            verify_candidate(candidate.path)
        except (CheckpointError, OSError) as error:
            logger.warning("skipping %s: %s", candidate.path, error)
            continue
        return candidate.path
    return None
