"""What a checkpoint envelope is, without torch: its format name and version, the
:class:`Checkpoint` read from it, and :func:`unpack`, the schema check of an unpickled envelope.

:mod:`.envelope` writes and reads envelopes with torch; :mod:`.plainread` reads one without
torch for the checks of ``nnhandler verify``/``list`` (tensors are stood in for by
:class:`~.plainread.TensorRef`). Both hand the unpickled object to :func:`unpack`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ..errors import CheckpointFormatError
from .content import check_envelope
from .migrations import migrate

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "Checkpoint", "unpack"]

FORMAT_NAME: Final = "nnhandler.checkpoint"
FORMAT_VERSION: Final = 1


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as read from disk."""

    path: Path
    format_version: int
    meta: dict[str, Any]
    state: dict[str, Any]

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])


def unpack(path: Path, envelope: Any) -> Checkpoint:
    """The envelope checked against the declared schema (:mod:`.content`) before anything
    uses it; older format versions are migrated first, newer ones refused."""
    where = str(path)
    if not isinstance(envelope, dict) or not isinstance(envelope.get("format"), dict):
        raise CheckpointFormatError(f"{where!r} is not an nnhandler checkpoint (no 'format')")
    fmt = envelope["format"]
    if fmt.get("name") != FORMAT_NAME:
        raise CheckpointFormatError(
            f"{where!r} has format {fmt.get('name')!r:.80}, expected {FORMAT_NAME!r}"
        )
    version = fmt.get("version")
    if type(version) is not int:
        raise CheckpointFormatError(f"{where!r} has no valid format version: {version!r:.80}")
    envelope = migrate(envelope, version, FORMAT_VERSION, repr(where))
    record = check_envelope(envelope, where)
    return Checkpoint(path=path, format_version=version, meta=record.meta.model_dump(),
                      state=envelope["state"])
