"""The retention index: one JSON file per auto-save directory that says which checkpoints each
auto-save callback keeps, and why.

``save_path/nnhandler-index.json``::

    {"format": {"name": "nnhandler.index", "version": 1},
     "updated": "2025-01-01T12:00:00+00:00",
     "callbacks": {
       "autosave:ck/ep{epoch:03d}": {               # the callback's state_key
         "lineage": "9f2c…",                        # the run (and its resumes) that owns the files
         "rules": {"keep_last": 2, "keep_best": 1, "monitor": "val_loss", "mode": "min",
                   "keep_every": null},
         "next_seq": 7,
         "checkpoints": [{"name": "ep006.pth", "epoch": 6, "step": 12, "seq": 6,
                          "value": 0.25, "reasons": ["latest 1/2"]}, …],
         "removing": ["ep004.pth"]}}}               # superseded, removal pending or done

Only rank 0 writes it, always atomically (temp file in the same directory, fsync, rename,
directory fsync) and only after the checkpoint it describes is durable. Each callback replaces
only its own section; a lock per directory orders the read-modify-write of callbacks (and
background writer threads) in one process. Two jobs must not share one ``save_path``.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Final

from ..errors import CheckpointIndexError
from .writer import atomic_write

__all__ = [
    "INDEX_FILE",
    "INDEX_FORMAT",
    "INDEX_VERSION",
    "IndexEntry",
    "IndexSection",
    "read_index",
    "update_index",
]

INDEX_FILE: Final = "nnhandler-index.json"
INDEX_FORMAT: Final = "nnhandler.index"
INDEX_VERSION: Final = 1

_LOCKS: Final[dict[Path, threading.Lock]] = {}
_LOCKS_GUARD: Final = threading.Lock()


@dataclass(frozen=True)
class IndexEntry:
    """One checkpoint a callback owns: its file name in the directory, the epoch and step it
    was written at, its place in the callback's write order (``seq``), the monitored value
    (``None`` when missing or not finite) and why it is kept. ``partial``: an emergency
    checkpoint written inside an epoch (preemption, exception): never ``keep_best`` or
    ``keep_every`` material, only recent."""

    name: str
    epoch: int
    step: int
    seq: int
    value: float | None = None
    reasons: tuple[str, ...] = ()
    partial: bool = False

    def to_json(self) -> dict[str, Any]:
        data = {"name": self.name, "epoch": self.epoch, "step": self.step, "seq": self.seq,
                "value": self.value, "reasons": list(self.reasons)}
        if self.partial:
            data["partial"] = True
        return data

    @classmethod
    def from_json(cls, data: Any) -> IndexEntry:
        if not isinstance(data, Mapping):
            raise TypeError(f"a checkpoint entry must be an object, not {data!r}")
        value = data.get("value")
        if value is not None and not _is_finite_number(value):
            raise TypeError(f"value {value!r} of {data.get('name')!r} is not a finite number")
        reasons = data.get("reasons", [])
        if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
            raise TypeError(f"reasons of {data.get('name')!r} must be a list of strings")
        partial = data.get("partial", False)
        if type(partial) is not bool:
            raise TypeError(f"partial of {data.get('name')!r} must be true or false, "
                            f"not {partial!r}")
        return cls(name=_string(data["name"], "name"), epoch=_integer(data["epoch"], "epoch"),
                   step=_integer(data["step"], "step"), seq=_integer(data["seq"], "seq"),
                   value=None if value is None else float(value), reasons=tuple(reasons),
                   partial=partial)


@dataclass(frozen=True)
class IndexSection:
    """What one auto-save callback (one ``state_key``) records in the index."""

    lineage: str
    rules: dict[str, Any]
    next_seq: int
    checkpoints: tuple[IndexEntry, ...]
    removing: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"lineage": self.lineage, "rules": dict(self.rules), "next_seq": self.next_seq,
                "checkpoints": [entry.to_json() for entry in self.checkpoints],
                "removing": list(self.removing)}

    @classmethod
    def from_json(cls, data: Any) -> IndexSection:
        if not isinstance(data, Mapping):
            raise TypeError(f"a callback section must be an object, not {data!r}")
        checkpoints, removing, rules = data["checkpoints"], data.get("removing", []), data["rules"]
        if not isinstance(checkpoints, list) or not isinstance(rules, Mapping):
            raise TypeError("'checkpoints' must be a list and 'rules' an object")
        if not isinstance(removing, list):
            raise TypeError("'removing' must be a list")
        return cls(lineage=_string(data["lineage"], "lineage"), rules=dict(rules),
                   next_seq=_integer(data["next_seq"], "next_seq"),
                   checkpoints=tuple(IndexEntry.from_json(entry) for entry in checkpoints),
                   removing=tuple(_string(name, "removing") for name in removing))


def index_path(directory: str | Path) -> Path:
    return Path(directory) / INDEX_FILE


def read_index(directory: str | Path) -> dict[str, IndexSection] | None:
    """The sections of the index in ``directory`` by ``state_key``; ``None`` when there is no
    index. An index that cannot be read, is not valid JSON, has the wrong structure or a newer
    format version raises :class:`~nnhandler.CheckpointIndexError` saying why."""
    path = index_path(directory)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise CheckpointIndexError(f"cannot read the index {str(path)!r}: {error}") from error
    try:
        data = json.loads(raw)
        name, version = data["format"]["name"], data["format"]["version"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointIndexError(f"the index {str(path)!r} is damaged: "
                                   f"{type(error).__name__}: {error}") from error
    if name != INDEX_FORMAT or type(version) is not int or version > INDEX_VERSION:
        raise CheckpointIndexError(
            f"the index {str(path)!r} has format {name!r} version {version!r}; this nnhandler "
            f"reads {INDEX_FORMAT!r} up to version {INDEX_VERSION}")
    try:
        callbacks = data["callbacks"]
        if not isinstance(callbacks, Mapping):
            raise TypeError("'callbacks' must be an object")
        return {_string(key, "key"): IndexSection.from_json(section)
                for key, section in callbacks.items()}
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointIndexError(f"the index {str(path)!r} is damaged: "
                                   f"{type(error).__name__}: {error}") from error


def update_index(directory: str | Path, key: str,
                 section: IndexSection) -> tuple[dict[str, IndexSection], str | None]:
    """Replace ``key``'s section of the index in ``directory`` (creating the index if need be)
    and write it atomically. Returns every section now in the index and, when the old index
    could not be read (it is then rebuilt from ``section`` alone), the reason."""
    directory = Path(directory)
    with _lock_for(directory):
        problem = None
        try:
            sections = read_index(directory) or {}
        except CheckpointIndexError as error:
            sections, problem = {}, str(error)
        sections[key] = section
        document = {
            "format": {"name": INDEX_FORMAT, "version": INDEX_VERSION},
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "callbacks": {name: value.to_json() for name, value in sorted(sections.items())},
        }
        data = (json.dumps(document, indent=1, allow_nan=False) + "\n").encode()

        def write(file: BinaryIO) -> None:
            file.write(data)

        atomic_write(index_path(directory), write)
        return sections, problem


def _lock_for(directory: Path) -> threading.Lock:
    key = directory.resolve()
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


def _is_finite_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _integer(value: Any, what: str) -> int:
    if type(value) is not int:
        raise TypeError(f"{what} must be an integer, not {value!r}")
    return value


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, not {value!r}")
    return value
