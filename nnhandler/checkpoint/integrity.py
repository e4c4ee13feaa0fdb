"""Whole-file integrity for checkpoints: a CRC-32 computed while the file is written.

Layout: the checkpoint is a zip file (``torch.save``); its end-of-central-directory record ends
in a 2-byte comment length, and the integrity record is stored as the zip *comment*, so the file
stays a valid zip that ``torch.load(weights_only=True)`` opens. The record is::

    MAGIC  JSON  footer(json length: u32, crc32(MAGIC + JSON): u32, TAG)

and the JSON holds ``covered_size`` (bytes before the comment-length field) and ``crc32`` of
those bytes, plus the checkpoint's epoch, step, time and logs, so that a directory can be ranked
by reading a few hundred bytes per file. CRC-32 detects every single-bit flip and every burst up
to 32 bits; truncation removes the record, which is detected as well.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO, Final

from ..errors import CheckpointCorruptedError

try:  # ISA-L's CRC-32: the same values as zlib.crc32, 6-30x faster (PCLMUL/SIMD)
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - platforms without an isal wheel
    from zlib import crc32

__all__ = ["ChecksummingWriter", "IntegrityRecord", "crc32", "file_crc32", "read_integrity_record",
           "verify_file"]

MAGIC: Final = b"\nNNHANDLER-INTEGRITY\n"
TAG: Final = b"NNHI"
_FOOTER: Final = struct.Struct("<II4s")
_EOCD_SIGNATURE: Final = b"PK\x05\x06"
_EOCD_SIZE: Final = 22
_CHUNK: Final = 16 * 1024 * 1024
_MAX_RECORD: Final = 65535  # a zip comment's length is a u16


class ChecksummingWriter:
    """A write-only file wrapper that CRCs everything except the final 2 bytes as it goes.

    The final 2 bytes of a zip written by ``torch.save`` are the (zero) comment length, which
    :meth:`finish` replaces; holding them back keeps the checksum independent of that patch.
    """

    __slots__ = ("_crc", "_file", "_held", "_size", "_tail", "write_error")

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._crc = 0
        self._held = b""
        self._size = 0
        self._tail = b""
        #: the first ``OSError`` of the underlying file (ENOSPC, EIO …); ``torch.save`` may hide
        #: it behind a ``RuntimeError`` of its own, so the caller re-raises this one
        self.write_error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        try:
            written = self._file.write(view)
        except OSError as error:
            if self.write_error is None:
                self.write_error = error
            raise
        if len(view) >= 2:
            self._crc = crc32(view[:-2], crc32(self._held, self._crc))
            self._held = bytes(view[-2:])
        else:
            combined = self._held + bytes(view)
            self._crc = crc32(combined[:-2], self._crc)
            self._held = combined[-2:]
        self._tail = (self._tail + bytes(view[-_EOCD_SIZE:]))[-_EOCD_SIZE:]
        self._size += len(view)
        return written if written is not None else len(view)

    def flush(self) -> None:
        self._file.flush()

    def finish(self, metadata: dict[str, Any]) -> int:
        """Append the integrity record as the zip comment; returns the final file size."""
        tail_ok = len(self._tail) == _EOCD_SIZE and self._tail[:4] == _EOCD_SIGNATURE
        if not tail_ok or self._held != b"\0\0":
            raise ValueError("the written data does not end in a comment-less zip EOCD record")
        payload = json.dumps(
            {**metadata, "algorithm": "crc32", "covered_size": self._size - 2, "crc32": self._crc},
            allow_nan=True, separators=(",", ":"), sort_keys=True,
        ).encode()
        head = MAGIC + payload
        record = head + _FOOTER.pack(len(payload), crc32(head), TAG)
        if len(record) > _MAX_RECORD:
            raise ValueError(f"integrity record of {len(record)} bytes exceeds a zip comment")
        self._file.seek(self._size - 2)
        self._file.write(struct.pack("<H", len(record)))
        self._file.seek(self._size)
        self._file.write(record)
        return self._size + len(record)


class IntegrityRecord(dict[str, Any]):
    """The JSON of a checkpoint's integrity record (epoch, step, logs, crc32, covered_size)."""

    @property
    def epoch(self) -> int:
        return int(self["epoch"])


def read_integrity_record(path: Path) -> IntegrityRecord:
    """Read and check the record at the end of ``path`` (a few hundred bytes are read)."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        if size < _FOOTER.size + len(MAGIC) + _EOCD_SIZE:
            raise CheckpointCorruptedError(f"{str(path)!r}: {size} bytes is too short to be a "
                                           "checkpoint (truncated?)")
        file.seek(size - _FOOTER.size)
        json_length, head_crc, tag = _FOOTER.unpack(file.read(_FOOTER.size))
        record_length = len(MAGIC) + json_length + _FOOTER.size
        if tag != TAG or record_length > min(size - _EOCD_SIZE, _MAX_RECORD):
            raise CheckpointCorruptedError(
                f"{str(path)!r} has no intact integrity record at its end (truncated, damaged, "
                "or not written by nnhandler)"
            )
        file.seek(size - record_length - 2)
        comment_length = struct.unpack("<H", file.read(2))[0]
        head = file.read(len(MAGIC) + json_length)
    if crc32(head) != head_crc or not head.startswith(MAGIC):
        raise CheckpointCorruptedError(f"{str(path)!r}: the integrity record is damaged")
    if comment_length != record_length:
        raise CheckpointCorruptedError(f"{str(path)!r}: the zip comment length is damaged")
    try:
        record = IntegrityRecord(json.loads(head[len(MAGIC):]))
    except ValueError as error:  # cannot happen with a matching CRC unless written wrongly
        raise CheckpointCorruptedError(f"{str(path)!r}: unreadable integrity record") from error
    if record.get("covered_size") != size - record_length - 2:
        raise CheckpointCorruptedError(
            f"{str(path)!r}: the file is {size} bytes, its record expects "
            f"{record.get('covered_size', 0) + record_length + 2} (truncated or extended)"
        )
    return record


def file_crc32(path: str | os.PathLike[str], limit: int | None = None) -> tuple[int, int]:
    """``(bytes read, CRC-32)`` of the first ``limit`` bytes of ``path`` (all with ``None``)."""
    remaining = os.stat(path).st_size if limit is None else limit
    read = crc = 0
    with open(path, "rb", buffering=0) as file:
        buffer = bytearray(min(_CHUNK, max(remaining, 1)))
        view = memoryview(buffer)
        while remaining > 0:
            count = file.readinto(view[: min(len(buffer), remaining)])
            if not count:
                break
            crc = crc32(view[:count], crc)
            read += count
            remaining -= count
    return read, crc


def verify_file(path: str | os.PathLike[str]) -> IntegrityRecord:
    """Check the whole file against its CRC-32; raises :class:`CheckpointCorruptedError`."""
    path = Path(path)
    record = read_integrity_record(path)
    size, crc = file_crc32(path, int(record["covered_size"]))
    if size != record["covered_size"] or crc != record["crc32"]:
        raise CheckpointCorruptedError(
            f"{str(path)!r} is corrupted: CRC-32 of its content is {crc:08x}, the checkpoint "
            f"recorded {int(record['crc32']):08x}"
        )
    return record
