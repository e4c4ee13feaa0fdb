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
                          "value": 0.25, "reasons": ["latest 1/2"]},
                         {"name": "ep007_b0003.pth", "epoch": 6, "step": 13, "seq": 7,
                          "value": 0.24, "reasons": ["latest 2/2"], "batch": 3}, …],
         "removing": ["ep004.pth"]}}}               # superseded, removal pending or done

Only rank 0 writes it, always atomically (temp file in the same directory, fsync, rename,
directory fsync) and only after the checkpoint it describes is durable. Each callback replaces
only its own section; a lock per directory orders the read-modify-write of callbacks (and
background writer threads) in one process. Two jobs must not share one ``save_path``.

In object storage (a URL ``save_path``, given with its :class:`~.storage.Store`) the index is
one object, replaced whole by a single PUT after the checkpoint it describes is complete:
readers see the old index or the new one, never a mix. (The write is not conditional: one
writer, rank 0, owns a prefix, as locally.)
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, Final

from pydantic import Field

from ..errors import CheckpointIndexError, CheckpointSchemaError
from .schema import Schema, validate
from .writer import atomic_write

if TYPE_CHECKING:
    from .storage import Store

__all__ = [
    "INDEX_FILE",
    "INDEX_FORMAT",
    "INDEX_VERSION",
    "IndexEntry",
    "IndexEntryRecord",
    "IndexSection",
    "IndexSectionRecord",
    "read_index",
    "update_index",
]

INDEX_FILE: Final = "nnhandler-index.json"
INDEX_FORMAT: Final = "nnhandler.index"
INDEX_VERSION: Final = 1

_LOCKS: Final[dict[Path | str, threading.Lock]] = {}
_LOCKS_GUARD: Final = threading.Lock()


@dataclass(frozen=True)
class IndexEntry:
    """One checkpoint a callback owns: its file name in the directory, the epoch and step it
    was written at, its place in the callback's write order (``seq``), the monitored value
    (``None`` when missing or not finite) and why it is kept. ``partial``: an emergency
    checkpoint written inside an epoch (preemption, exception): never ``keep_best`` or
    ``keep_every`` material, only recent. ``batch``: a checkpoint written inside an epoch
    (emergency, or by ``every_n_steps``/``every_seconds``), after that many batches of the
    epoch after ``epoch``; ``None`` at an epoch's end."""

    name: str
    epoch: int
    step: int
    seq: int
    value: float | None = None
    reasons: tuple[str, ...] = ()
    partial: bool = False
    batch: int | None = None

    def to_json(self) -> dict[str, Any]:
        data = {"name": self.name, "epoch": self.epoch, "step": self.step, "seq": self.seq,
                "value": self.value, "reasons": list(self.reasons)}
        if self.partial:
            data["partial"] = True
        if self.batch is not None:
            data["batch"] = self.batch
        return data

    @classmethod
    def from_json(cls, data: Any, *, where: str = "entry", path: str | None = None
                  ) -> IndexEntry:
        """An entry read back from the index or a checkpoint, checked against
        :class:`IndexEntryRecord` (a :class:`~nnhandler.CheckpointSchemaError` names ``path``
        and the field when it does not fit)."""
        return validate(IndexEntryRecord, data, where=where, path=path).entry()


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
    def from_json(cls, data: Any, *, where: str = "section", path: str | None = None
                  ) -> IndexSection:
        """A section read back from the index, checked against :class:`IndexSectionRecord`."""
        record = validate(IndexSectionRecord, data, where=where, path=path)
        return cls(lineage=record.lineage, rules=dict(record.rules), next_seq=record.next_seq,
                   checkpoints=tuple(entry.entry() for entry in record.checkpoints),
                   removing=tuple(record.removing))


class IndexEntryRecord(Schema):
    """The schema of one :class:`IndexEntry` as stored (JSON in the index, plain data in a
    checkpoint's retention bookkeeping)."""

    name: str
    epoch: int = Field(ge=0)
    step: int = Field(ge=0)
    seq: int = Field(ge=0)
    value: Annotated[float, Field(allow_inf_nan=False)] | None = None
    reasons: list[str] = []
    partial: bool = False
    batch: int | None = Field(default=None, ge=0)

    def entry(self) -> IndexEntry:
        return IndexEntry(name=self.name, epoch=self.epoch, step=self.step, seq=self.seq,
                          value=self.value, reasons=tuple(self.reasons), partial=self.partial,
                          batch=self.batch)


class IndexSectionRecord(Schema):
    """The schema of one callback's :class:`IndexSection` in the index."""

    lineage: str
    rules: dict[str, Any]
    next_seq: int = Field(ge=0)
    checkpoints: list[IndexEntryRecord]
    removing: list[str] = []


def index_path(directory: str | Path) -> Path:
    return Path(directory) / INDEX_FILE


def read_index(directory: str | Path,
               store: Store | None = None) -> dict[str, IndexSection] | None:
    """The sections of the index in ``directory`` by ``state_key``; ``None`` when there is no
    index. An index that cannot be read, is not valid JSON, has the wrong structure or a newer
    format version raises :class:`~nnhandler.CheckpointIndexError` saying why. ``store``:
    the object store of a URL ``directory``."""
    remote = store if store is not None and not store.local else None
    path: Any = directory / INDEX_FILE if remote else index_path(directory)  # type: ignore[operator]
    try:
        raw = remote.get_bytes(path) if remote else path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise CheckpointIndexError(f"cannot read the index {str(path)!r}: {error}") from error
    if raw is None:
        return None
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
        return {_string(key, "key"): IndexSection.from_json(
                    section, where=f"callbacks[{key!r}]", path=str(path))
                for key, section in callbacks.items()}
    except CheckpointSchemaError as error:
        raise CheckpointIndexError(str(error)) from error
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointIndexError(f"the index {str(path)!r} is damaged: "
                                   f"{type(error).__name__}: {error}") from error


def update_index(directory: str | Path, key: str, section: IndexSection,
                 store: Store | None = None) -> tuple[dict[str, IndexSection], str | None]:
    """Replace ``key``'s section of the index in ``directory`` (creating the index if need be)
    and write it atomically. Returns every section now in the index and, when the old index
    could not be read (it is then rebuilt from ``section`` alone), the reason. ``store``: the
    object store of a URL ``directory`` (the index is then one object, put whole)."""
    remote = store is not None and not store.local
    if not remote:
        directory = Path(directory)
    with _lock_for(directory):
        problem = None
        try:
            sections = read_index(directory, store) or {}
        except CheckpointIndexError as error:
            if remote and isinstance(error.__cause__, OSError):
                raise  # the store did not answer: never rebuild over others' sections
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

        if remote:
            assert store is not None
            store.put_bytes(directory / INDEX_FILE, data)  # type: ignore[operator]
        else:
            atomic_write(index_path(directory), write)
        return sections, problem


def _lock_for(directory: str | Path) -> threading.Lock:
    key = directory.resolve() if isinstance(directory, Path) else str(directory)
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, not {value!r}")
    return value
