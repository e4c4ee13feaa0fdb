"""The zip container ``torch.load`` reads, written in one sequential pass with large writes.

Layout (as ``torch.save`` writes it): records ``archive/data.pkl``, ``.format_version``,
``.storage_alignment``, ``byteorder``, ``data/<key>`` for every storage, ``version`` and
``.data/serialization_id``, all *stored* (uncompressed), each record's data starting at a multiple
of 64 bytes (a padding extra field, torch's ``FB`` id) so that ``torch.load(mmap=True)`` works.
Zip64 fields are written where sizes, offsets or the entry count need them.

Unlike ``torch.save`` the CRC-32 of every record is computed with ISA-L (the same CRC at 6-30x
zlib's speed) and written in the local header, so no data descriptors follow the data; the
CRC-32 of the whole file is derived from the records' CRCs (``crc32_combine``), so every byte is
checksummed once. Small records and headers are gathered into large writes; big storages are
written straight from their memory.
"""

from __future__ import annotations

import ctypes
import secrets
import struct
import sys
from collections.abc import Callable, Sequence
from typing import BinaryIO, Final

import torch

from .integrity import crc32, crc32_combine
from .pickling import StorageRecord

__all__ = ["ALIGNMENT", "ARCHIVE", "host_view", "write_torch_zip"]

ARCHIVE: Final = "archive"
ALIGNMENT: Final = 64
#: what ``torch.save`` records as its file format version and ``.format_version``
_FILE_FORMAT_VERSION: Final = b"3\n"
_PICKLE_FORMAT_VERSION: Final = b"1"
#: values from here on need zip64 fields (module constants, so tests can lower them)
_ZIP64_LIMIT = 0xFFFFFFFF
_ZIP64_COUNT_LIMIT = 0xFFFF
#: records this large are written straight from memory; smaller ones are gathered
_DIRECT_WRITE: Final = 512 * 1024
_GATHER: Final = 4 * 1024 * 1024

_LOCAL: Final = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL: Final = struct.Struct("<4sHHHHHHIIIHHHHHII")
_EOCD64: Final = struct.Struct("<4sQHHIIQQQQ")
_EOCD64_LOCATOR: Final = struct.Struct("<4sIQI")
_EOCD_HEAD: Final = struct.Struct("<4sHHHHII")  # the end record without its comment length
_UTF8_NAMES: Final = 0x0800
_VERSION_PLAIN: Final = 20
_VERSION_ZIP64: Final = 45
_PREFIX: Final = f"{ARCHIVE}/".encode()


def _padding(length: int) -> bytes:
    """An extra field (torch's ``FB`` id, filled with ``Z``) of ``length`` bytes, or of
    ``length + ALIGNMENT`` where ``length`` cannot hold the field's 4-byte header."""
    if length == 0:
        return b""
    if length < 4:
        length += ALIGNMENT
    return b"FB" + struct.pack("<H", length - 4) + b"Z" * (length - 4)


#: the padding extra field for each distance to the next alignment boundary
_PADDINGS: Final = tuple(_padding(length) for length in range(ALIGNMENT))


class _ZipOut:
    """Sequential zip output with a running CRC-32 of everything written."""

    __slots__ = ("_central", "_file", "_filled", "_gathered", "crc", "offset")

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._gathered = memoryview(bytearray(_GATHER))  # allocated once per file
        self._filled = 0
        self._central: list[tuple[bytes, int, int, int]] = []
        self.offset = 0
        self.crc = 0

    def _put(self, data: bytes | memoryview) -> None:
        """Gather small pieces; their CRC is taken once per gathered block."""
        size = len(data)
        if self._filled + size > _GATHER:
            self.flush()
        self._gathered[self._filled:self._filled + size] = data
        self._filled += size
        self.offset += size

    def _put_direct(self, data: memoryview, crc: int) -> None:
        """Write a large record's data straight from its memory (its CRC is known)."""
        self.flush()
        self._file.write(data)
        self.crc = crc32_combine(self.crc, crc, len(data))
        self.offset += len(data)

    def flush(self) -> None:
        if self._filled:
            block = self._gathered[:self._filled]
            self.crc = crc32(block, self.crc)
            self._file.write(block)
            self._filled = 0

    def add(self, name: bytes, data: bytes | memoryview) -> None:
        """Append a stored record (``name`` below the archive folder) whose data starts on an
        ``ALIGNMENT`` boundary."""
        encoded = _PREFIX + name
        size = len(data)
        crc = crc32(data)
        zip64 = size >= _ZIP64_LIMIT
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        extra += _PADDINGS[-(self.offset + _LOCAL.size + len(encoded) + len(extra)) % ALIGNMENT]
        stored = 0xFFFFFFFF if zip64 else size
        self._central.append((encoded, crc, size, self.offset))
        self._put(_LOCAL.pack(b"PK\x03\x04", _VERSION_ZIP64 if zip64 else _VERSION_PLAIN,
                              _UTF8_NAMES, 0, 0, 0, crc, stored, stored, len(encoded),
                              len(extra)) + encoded + extra)
        if size >= _DIRECT_WRITE:
            self._put_direct(memoryview(data), crc)
        elif size:
            self._put(data)

    def finish(self, comment_for: Callable[[int, int], bytes]) -> int:
        """Write the central directory and end records; the zip comment is
        ``comment_for(covered_size, crc)`` of everything before the comment-length field.
        Returns the file size."""
        directory_start = self.offset
        for encoded, crc, size, offset in self._central:
            values = [value for value in (size, size, offset) if value >= _ZIP64_LIMIT]
            extra = struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values \
                else b""
            self._put(_CENTRAL.pack(
                b"PK\x01\x02", _VERSION_ZIP64 if values else _VERSION_PLAIN,
                _VERSION_ZIP64 if values else _VERSION_PLAIN, _UTF8_NAMES, 0, 0, 0, crc,
                size if size < _ZIP64_LIMIT else 0xFFFFFFFF,
                size if size < _ZIP64_LIMIT else 0xFFFFFFFF,
                len(encoded), len(extra), 0, 0, 0, 0,
                offset if offset < _ZIP64_LIMIT else 0xFFFFFFFF,
            ) + encoded + extra)
        directory_size = self.offset - directory_start
        count = len(self._central)
        if (count >= _ZIP64_COUNT_LIMIT or directory_size >= _ZIP64_LIMIT
                or directory_start >= _ZIP64_LIMIT):
            end64 = self.offset
            self._put(_EOCD64.pack(b"PK\x06\x06", _EOCD64.size - 12, _VERSION_ZIP64,
                                   _VERSION_ZIP64, 0, 0, count, count, directory_size,
                                   directory_start))
            self._put(_EOCD64_LOCATOR.pack(b"PK\x06\x07", 0, end64, 1))
            count, directory_size, directory_start = 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF
        self._put(_EOCD_HEAD.pack(b"PK\x05\x06", 0, 0, count, count, directory_size,
                                  directory_start))
        self.flush()  # brings the CRC up to date
        comment = comment_for(self.offset, self.crc)
        if len(comment) > 0xFFFF:
            raise ValueError(f"a zip comment of {len(comment)} bytes exceeds 65535")
        self._put(struct.pack("<H", len(comment)) + comment)
        self.flush()
        return self.offset


def host_view(storage: torch.UntypedStorage) -> tuple[memoryview, torch.UntypedStorage]:
    """The bytes of ``storage`` in host memory and the storage that owns them (keep it alive
    while the view is used). Device storages are copied to the host first."""
    if storage.device.type != "cpu":
        storage = storage.cpu()  # type: ignore[no-untyped-call]
    size = storage.nbytes()
    if size == 0:
        return memoryview(b""), storage
    array = (ctypes.c_ubyte * size).from_address(storage.data_ptr())
    return memoryview(array).cast("B"), storage


def write_torch_zip(
    file: BinaryIO, pickled: bytes, storages: Sequence[StorageRecord],
    comment_for: Callable[[int, int], bytes],
) -> int:
    """Write ``pickled`` (``data.pkl``) and ``storages`` as a zip ``torch.load`` opens, with
    ``comment_for(covered_size, crc32)`` as its comment; returns the file size."""
    out = _ZipOut(file)
    out.add(b"data.pkl", pickled)
    out.add(b".format_version", _PICKLE_FORMAT_VERSION)
    out.add(b".storage_alignment", str(ALIGNMENT).encode())
    out.add(b"byteorder", sys.byteorder.encode())
    for record in storages:
        if isinstance(record.data, memoryview):
            out.add(b"data/" + record.key.encode(), record.data)
        else:
            view, owner = host_view(record.data)
            out.add(b"data/" + record.key.encode(), view)
            del view, owner
    out.add(b"version", _FILE_FORMAT_VERSION)
    out.add(b".data/serialization_id", f"{secrets.randbits(128):040d}".encode())
    return out.finish(comment_for)
