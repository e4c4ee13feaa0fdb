"""Whole-file integrity for checkpoints: a CRC-32 computed while the file is written.

Layout: the checkpoint is a zip file in ``torch.save``'s format (:mod:`.zipwriter`); its
end-of-central-directory record ends in a 2-byte comment length, and the integrity record is
stored as the zip *comment*, so the file stays a valid zip that
``torch.load(weights_only=True)`` opens. The record is::

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
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import Field

from ..errors import CheckpointCorruptedError
from .schema import LogValue, Schema, schema_error, validate

try:  # ISA-L's CRC-32: the same values as zlib.crc32, 6-30x faster (PCLMUL/SIMD)
    from isal.isal_zlib import crc32, crc32_combine
except ImportError:  # pragma: no cover - platforms without an isal wheel
    from zlib import crc32

    def crc32_combine(crc1: int, crc2: int, length2: int, /) -> int:
        """CRC-32 of ``a + b`` from ``crc32(a)``, ``crc32(b)`` and ``len(b)`` (zlib's method:
        multiply ``crc1`` by x^(8 * length2) modulo the CRC polynomial)."""
        return _multiply(_x_power_8n(length2), crc1) ^ crc2

    _POLY = 0xEDB88320

    def _multiply(a: int, b: int) -> int:
        product, m = 0, 1 << 31
        while m:
            if a & m:
                product ^= b
                if (a & (m - 1)) == 0:
                    break
            m >>= 1
            b = (b >> 1) ^ _POLY if b & 1 else b >> 1
        return product

    def _x_power_8n(n: int) -> int:
        power, square = 1 << 31, 1 << 30  # x^0, then x^(2^k) for k = 0, 1, …; start at x^8
        for _ in range(3):
            square = _multiply(square, square)
        while n:
            if n & 1:
                power = _multiply(square, power)
            n >>= 1
            square = _multiply(square, square)
        return power

__all__ = ["TAIL_PREFETCH", "IntegrityRecord", "corruption", "crc32", "crc32_combine",
           "file_crc32", "integrity_record", "parse_integrity_record", "read_integrity_record",
           "verify_file"]

MAGIC: Final = b"\nNNHANDLER-INTEGRITY\n"
TAG: Final = b"NNHI"
_FOOTER: Final = struct.Struct("<II4s")
_EOCD_SIZE: Final = 22
#: a buffer that stays in the cache between the read and the CRC (16 MiB cost ~25% more)
_CHUNK: Final = 1024 * 1024
_MAX_RECORD: Final = 65535  # a zip comment's length is a u16


def integrity_record(metadata: dict[str, Any], covered_size: int, crc: int) -> bytes:
    """The record stored as the zip comment: ``metadata`` plus the CRC-32 of the first
    ``covered_size`` bytes of the file (everything before the comment-length field)."""
    payload = json.dumps(
        {**metadata, "algorithm": "crc32", "covered_size": covered_size, "crc32": crc},
        allow_nan=True, separators=(",", ":"), sort_keys=True,
    ).encode()
    head = MAGIC + payload
    record = head + _FOOTER.pack(len(payload), crc32(head), TAG)
    if len(record) > _MAX_RECORD:
        raise ValueError(f"integrity record of {len(record)} bytes exceeds a zip comment")
    return record


class IntegrityRecordSchema(Schema):
    """What the JSON of an integrity record may hold (checked before any value is used)."""

    algorithm: Literal["crc32"]
    covered_size: Annotated[int, Field(ge=0)]
    crc32: Annotated[int, Field(ge=0, lt=2**32)]
    #: ``"export"``: the weights file of ``NNHandler.export`` (not a checkpoint)
    kind: Literal["checkpoint", "export"] = "checkpoint"
    format_version: Annotated[int, Field(ge=0)] | None = None
    epoch: Annotated[int, Field(ge=0)] | None = None
    step: Annotated[int, Field(ge=0)] | None = None
    time: str | None = None
    logs: dict[str, LogValue] = {}
    lineage: str | None = None


class IntegrityRecord(dict[str, Any]):
    """The JSON of a checkpoint's integrity record (epoch, step, logs, crc32, covered_size),
    validated against :class:`IntegrityRecordSchema` when read from a file."""

    @property
    def epoch(self) -> int:
        return int(self["epoch"])


def read_integrity_record(path: Path) -> IntegrityRecord:
    """Read and check the record at the end of ``path`` (a few hundred bytes are read)."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        def read_tail(length: int) -> bytes:
            file.seek(size - length)
            return file.read(length)

        return parse_integrity_record(read_tail, size, str(path))


#: bytes a remote tail read fetches at once: the record of an ordinary checkpoint fits
TAIL_PREFETCH: Final = 16 * 1024


def parse_integrity_record(read_tail: Callable[[int], bytes], size: int,
                           where: str) -> IntegrityRecord:
    """Check the integrity record of a file of ``size`` bytes, read by ``read_tail(n)`` (the
    file's last ``n`` bytes; called twice: the footer, then the record); ``where`` names it."""
    if size < _FOOTER.size + len(MAGIC) + _EOCD_SIZE:
        raise CheckpointCorruptedError(f"{where!r}: {size} bytes is too short to be a "
                                       "checkpoint (truncated?)")
    json_length, head_crc, tag = _FOOTER.unpack(read_tail(_FOOTER.size))
    record_length = len(MAGIC) + json_length + _FOOTER.size
    if tag != TAG or record_length > min(size - _EOCD_SIZE, _MAX_RECORD):
        raise CheckpointCorruptedError(
            f"{where!r} has no intact integrity record at its end (truncated, damaged, "
            "or not written by nnhandler)"
        )
    tail = read_tail(record_length + 2)
    comment_length = struct.unpack("<H", tail[:2])[0]
    head = tail[2:2 + len(MAGIC) + json_length]
    if crc32(head) != head_crc or not head.startswith(MAGIC):
        raise CheckpointCorruptedError(f"{where!r}: the integrity record is damaged")
    if comment_length != record_length:
        raise CheckpointCorruptedError(f"{where!r}: the zip comment length is damaged")
    try:
        data = json.loads(head[len(MAGIC):])
    except ValueError as error:  # cannot happen with a matching CRC unless written wrongly
        raise CheckpointCorruptedError(f"{where!r}: unreadable integrity record") from error
    validate(IntegrityRecordSchema, data, where="integrity record", path=where)
    record = IntegrityRecord(data)
    if record.get("kind", "checkpoint") == "checkpoint":
        for key in ("format_version", "epoch", "step"):
            if record.get(key) is None:
                raise schema_error("is missing (a checkpoint's record names it)",
                                   field=f"integrity record.{key}", path=where)
    if record["covered_size"] != size - record_length - 2:
        raise CheckpointCorruptedError(
            f"{where!r}: the file is {size} bytes, its record expects "
            f"{record['covered_size'] + record_length + 2} (truncated or extended)"
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
        raise corruption(path, crc, int(record["crc32"]))
    return record


def corruption(path: str | os.PathLike[str], crc: int, recorded: int) -> CheckpointCorruptedError:
    """The error for a file whose content's CRC-32 ``crc`` is not the ``recorded`` one."""
    return CheckpointCorruptedError(
        f"{str(path)!r} is corrupted: CRC-32 of its content is {crc:08x}, the checkpoint "
        f"recorded {recorded:08x}"
    )
