"""Finding the newest valid checkpoint in a directory — by recorded epoch, never by file time.

Candidates are ``*.pth`` files (ranked by their integrity record) and ``*.dcp`` sharded
checkpoint directories (ranked by their manifest).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from .integrity import IntegrityRecord, read_integrity_record, verify_file
from .sharded import SHARDED_SUFFIX, manifest_record, verify_sharded
from .writer import is_temp_file

__all__ = ["CheckpointCandidate", "find_latest_valid", "list_checkpoints"]

CHECKPOINT_GLOB = "*.pth"


@dataclass(frozen=True)
class CheckpointCandidate:
    path: Path
    record: IntegrityRecord | None
    problem: str | None

    @property
    def order(self) -> tuple[int, int, str]:
        record = self.record or IntegrityRecord()
        return (int(record.get("epoch", -1)), int(record.get("step", -1)),
                str(record.get("time", "")))


def list_checkpoints(directory: str | Path) -> list[CheckpointCandidate]:
    """Every ``*.pth`` file and ``*.dcp`` directory in ``directory`` (temp files excluded) with
    its integrity record (read from the file's tail or the manifest), newest recorded epoch
    first; unreadable ones last, with the reason."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    candidates = []
    for path in [*directory.glob(CHECKPOINT_GLOB), *directory.glob(f"*{SHARDED_SUFFIX}")]:
        if is_temp_file(path) or path.name.startswith("."):
            continue
        sharded = path.suffix == SHARDED_SUFFIX
        if not (path.is_dir() if sharded else path.is_file()):
            continue
        try:
            record = manifest_record(path) if sharded else read_integrity_record(path)
            candidates.append(CheckpointCandidate(path, record, None))
        except (CheckpointError, OSError) as error:
            candidates.append(CheckpointCandidate(path, None, str(error)))
    return sorted(candidates, key=lambda c: (c.record is not None, c.order, c.path.name),
                  reverse=True)


def find_latest_valid(directory: str | Path, logger: logging.Logger) -> Path | None:
    """The newest checkpoint in ``directory`` whose whole content verifies, or ``None``.

    Damaged or truncated files are skipped with a warning that says why.
    """
    candidates = list_checkpoints(directory)
    for candidate in candidates:
        # unreadable records come last in the ranking, but their epoch is unknown (often the
        # newest file, damaged): name each one even when an older valid file is chosen
        if candidate.record is None:
            logger.warning("skipping %s: %s", candidate.path, candidate.problem)
    for candidate in candidates:
        if candidate.record is None:
            continue
        try:
            if candidate.path.is_dir():
                verify_sharded(candidate.path)
            else:
                verify_file(candidate.path)
        except (CheckpointError, OSError) as error:
            logger.warning("skipping %s: %s", candidate.path, error)
            continue
        return candidate.path
    return None
