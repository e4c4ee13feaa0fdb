"""Refuse hostile zip layouts before anything is inflated: only the central directory is read.

A checkpoint is a zip in ``torch.save``'s format whose records are all *stored*
(:mod:`.zipwriter` never compresses). ``torch.load``'s reader (miniz) takes each record's
compression method and sizes from the central directory and would inflate a deflated record
into memory, so a crafted file could be a zip bomb, or declare records larger than itself or
records that share bytes (a stored "bomb": many records over the same data). Before
``torch.load`` opens a file, :func:`check_zip_layout` reads the end records and the central
directory (nothing else: its cost grows with the number of records, not with the file size)
and raises :class:`~nnhandler.CheckpointFormatError` naming the file and the record for:

- a record that is compressed (any method but stored) or encrypted, or whose compressed and
  uncompressed sizes differ;
- a record (its minimal 30-byte local header, name and data) that reaches past the central
  directory, the end of the file or ``covered_size``, or that overlaps another record;
- a central directory or end record that lies outside the file, a multi-disk archive, more
  than :data:`MAX_RECORDS` records, or a directory too small for the records it declares;
- a record name that is absolute (``/x``, ``\\x``, ``C:x``), has a ``..`` component,
  appears twice, or is not UTF-8 where its flags say it is.

Together these bound what reading a checkpoint can allocate by the file's own size. The local
headers are not read (one seek per record would cost more than the check is worth): the reader
uses only their name and extra-field lengths, and a record whose local header claims a longer
extra field than the space before the next record reads into that record's bytes, which stays
within the file and is caught by the CRC of the whole file when ``verify`` is on.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO, Final

from ..errors import CheckpointError, CheckpointFormatError

__all__ = ["MAX_RECORDS", "check_zip_layout"]

#: The most records a checkpoint may have. nnhandler writes one record per tensor storage plus
#: six; a model with millions of separate tensors (optimizer state included) is beyond any in
#: use. The central directory is bounded by the file size anyway (46 bytes per record at
#: least), so this limit only keeps a crafted directory's parsing short.
MAX_RECORDS: Final = 10_000_000

_EOCD: Final = struct.Struct("<4sHHHHIIH")
_EOCD_SIGNATURE: Final = b"PK\x05\x06"
_LOCATOR: Final = struct.Struct("<4sIQI")
_EOCD64: Final = struct.Struct("<4sQHHIIQQQQ")
#: the fields of a central directory entry this check needs (flags, method, sizes, name/extra/
#: comment lengths, disk, offset); the rest are skipped
_CENTRAL: Final = struct.Struct("<4s4xHH8xIIHHHH6xI")
_CENTRAL_SIZE: Final = 46
_CENTRAL_SIGNATURE: Final = b"PK\x01\x02"
_LOCAL_HEADER_SIZE: Final = 30
_MAX_COMMENT: Final = 0xFFFF
_STORED: Final = 0
_ENCRYPTED: Final = 0x1
_UTF8_NAMES: Final = 0x800
_ZIP64_EXTRA: Final = 1
_U32: Final = 0xFFFFFFFF


class _Directory:
    """Where the central directory is, as the end records declare it."""

    __slots__ = ("count", "end", "file_size", "offset", "size")

    def __init__(self, count: int, offset: int, size: int, end: int, file_size: int) -> None:
        self.count, self.offset, self.size = count, offset, size
        self.end = end  # where the end records start (the directory must end before)
        self.file_size = file_size


def check_zip_layout(path: str | os.PathLike[str], covered_size: int | None = None) -> None:
    """Raise :class:`~nnhandler.CheckpointFormatError` naming ``path`` (and the record) unless
    the file is a zip whose records are all stored, lie inside the file (or its first
    ``covered_size`` bytes) and do not overlap. Reads only the end records and the central
    directory; a file that cannot be read at all is a :class:`~nnhandler.CheckpointError`."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            limit = size if covered_size is None else min(size, covered_size)
            directory = _find_directory(file, size, limit, path)
            file.seek(directory.offset)
            entries = file.read(directory.size)
    except OSError as error:  # e.g. removed since it was listed
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {error}") from error
    if len(entries) != directory.size:
        raise _refusal(path, "its central directory is cut short")
    _check_records(path, entries, directory)


def _refusal(path: Path, what: str) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"{str(path)!r} is refused before anything is read from it: {what} (nnhandler "
        "checkpoints are zip files of stored records inside the file)"
    )


def _find_directory(file: BinaryIO, size: int, limit: int, path: Path) -> _Directory:
    tail_size = min(size, _EOCD.size + _MAX_COMMENT)
    file.seek(size - tail_size)
    tail = file.read(tail_size)
    position = tail.rfind(_EOCD_SIGNATURE)
    while position >= 0:  # the last end record whose comment reaches exactly to the file's end
        if position + _EOCD.size <= len(tail):
            fields = _EOCD.unpack_from(tail, position)
            if position + _EOCD.size + fields[7] == len(tail):
                break
        position = tail.rfind(_EOCD_SIGNATURE, 0, position)
    else:
        raise _refusal(path, "it is not a zip file (no end-of-central-directory record)")
    eocd = size - tail_size + position
    if eocd + _EOCD.size - 2 > limit:  # the comment length and comment are not covered
        raise _refusal(path, f"its end record at byte {eocd} lies past the covered "
                             f"{limit} bytes")
    _, disk, directory_disk, count_here, count, directory_size, offset, _ = fields
    if disk or directory_disk or count_here != count:
        raise _refusal(path, "it is a multi-disk archive")
    end = eocd
    zip64 = _zip64_end(file, eocd, path)
    if zip64 is not None:
        count, directory_size, offset, end = zip64
    if count > MAX_RECORDS:
        raise _refusal(path, f"it declares {count} records, more than the {MAX_RECORDS} a "
                             "checkpoint may have")
    if offset + directory_size > end:
        where = "past the end of the file" if offset + directory_size > size else \
            "into its end records"
        raise _refusal(path, f"its central directory (offset {offset}, {directory_size} bytes) "
                             f"reaches {where}")
    if directory_size < count * _CENTRAL_SIZE:
        raise _refusal(path, f"its central directory of {directory_size} bytes cannot hold the "
                             f"{count} records it declares")
    return _Directory(count, offset, directory_size, end, size)


def _zip64_end(file: BinaryIO, eocd: int, path: Path) -> tuple[int, int, int, int] | None:
    """``(count, directory size, directory offset, start)`` from the zip64 end record, or
    ``None`` where the file has no zip64 locator."""
    if eocd < _LOCATOR.size:
        return None
    file.seek(eocd - _LOCATOR.size)
    signature, disk, end64, disks = _LOCATOR.unpack(file.read(_LOCATOR.size))
    if signature != b"PK\x06\x07":
        return None
    if disk or disks != 1:
        raise _refusal(path, "it is a multi-disk archive")
    if end64 + _EOCD64.size > eocd - _LOCATOR.size:
        raise _refusal(path, f"its zip64 end record (offset {end64}) lies outside the file")
    file.seek(end64)
    (signature, _, _, _, disk, directory_disk, count_here, count, directory_size,
     offset) = _EOCD64.unpack(file.read(_EOCD64.size))
    if signature != b"PK\x06\x06":
        raise _refusal(path, f"its zip64 end record (offset {end64}) is missing")
    if disk or directory_disk or count_here != count:
        raise _refusal(path, "it is a multi-disk archive")
    return count, directory_size, offset, end64


def _check_records(path: Path, entries: bytes, directory: _Directory) -> None:
    spans: list[tuple[int, int, bytes]] = []
    names: set[bytes] = set()
    add_name, add_span = names.add, spans.append
    unpack, signature_ok = _CENTRAL.unpack_from, _CENTRAL_SIGNATURE
    position, available = 0, len(entries)
    for _ in range(directory.count):
        if position + _CENTRAL_SIZE > available:
            raise _refusal(path, "its central directory is shorter than its record count")
        (signature, flags, method, compressed, size, name_length, extra_length,
         comment_length, disk, offset) = unpack(entries, position)
        name_start = position + _CENTRAL_SIZE
        name_end = name_start + name_length
        name = entries[name_start:name_end]
        entry_end = name_end + extra_length + comment_length
        # one test for the common case: a stored record of ours, read below in full otherwise
        if (signature != signature_ok or entry_end > available or disk or method
                or flags & _ENCRYPTED or compressed != size or size == _U32 or offset == _U32
                or name in names or b".." in name or name[:1] in (b"/", b"\\")
                or name[1:2] == b":" or not name.isascii()):
            size, offset = _check_record(path, entries, position, directory, names)
        add_name(name)
        add_span((offset, offset + _LOCAL_HEADER_SIZE + name_length + size, name))
        position = entry_end
    _check_spans(path, spans, directory.offset, directory.file_size)


def _check_record(path: Path, entries: bytes, position: int, directory: _Directory,
                  seen: set[bytes]) -> tuple[int, int]:
    """The size and offset of the central directory entry at ``position``, or the refusal
    that names what is wrong with it."""
    (signature, flags, method, compressed, size, name_length, extra_length, comment_length,
     disk, offset) = _CENTRAL.unpack_from(entries, position)
    name_end = position + _CENTRAL_SIZE + name_length
    name = entries[position + _CENTRAL_SIZE:name_end]
    if signature != _CENTRAL_SIGNATURE or name_end + extra_length + comment_length > len(entries):
        raise _refusal(path, f"its central directory is damaged at byte "
                             f"{directory.offset + position}")
    if disk:
        raise _refusal(path, f"zip record {_text(name, flags)!r} is on another disk")
    if _U32 in (compressed, size, offset):
        size, compressed, offset = _zip64_values(
            path, name, entries[name_end:name_end + extra_length], size, compressed, offset)
    if method != _STORED or flags & _ENCRYPTED or compressed != size:
        raise _refusal(path, f"zip record {_text(name, flags)!r} is "
                             f"{_packing(method, flags, compressed, size)}")
    _check_name(path, name, flags, seen)
    return size, offset


def _zip64_values(path: Path, name: bytes, extra: bytes, size: int, compressed: int,
                  offset: int) -> tuple[int, int, int]:
    """The size, compressed size and offset of a record, those its header marks taken from
    its zip64 extra field (in that order)."""
    position = 0
    while position + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, position)
        if kind == _ZIP64_EXTRA:
            count = min(length, len(extra) - position - 4) // 8
            values = list(struct.unpack_from(f"<{count}Q", extra, position + 4))
            fields = [size, compressed, offset]
            for index, value in enumerate(fields):
                if value == _U32:
                    if not values:
                        break
                    fields[index] = values.pop(0)
            else:
                return fields[0], fields[1], fields[2]
            break
        position += 4 + length
    raise _refusal(path, f"zip record {_text(name, _UTF8_NAMES)!r} lacks the zip64 sizes its "
                         "header announces")


def _text(name: bytes, flags: int) -> str:
    return name.decode("utf-8" if flags & _UTF8_NAMES else "cp437", "replace")


def _packing(method: int, flags: int, compressed: int, size: int) -> str:
    if method != _STORED:
        return (f"compressed (method {method}: {compressed} bytes that would inflate to {size});"
                " checkpoints hold only stored records, so nothing was inflated")
    if flags & _ENCRYPTED:
        return "encrypted"
    return f"stored with a compressed size of {compressed} bytes but a size of {size}"


def _check_name(path: Path, name: bytes, flags: int, seen: set[bytes]) -> None:
    text = _text(name, flags)
    if flags & _UTF8_NAMES:
        try:
            name.decode("utf-8")
        except UnicodeDecodeError:
            raise _refusal(path, f"zip record {text!r} has a name that is not UTF-8") from None
    if name in seen:
        raise _refusal(path, f"zip record {text!r} appears twice")
    parts = text.replace("\\", "/").split("/")
    if text.startswith(("/", "\\")) or text[1:2] == ":":
        raise _refusal(path, f"zip record {text!r} has an absolute name")
    if ".." in parts:
        raise _refusal(path, f"zip record {text!r} has a '..' component")


def _check_spans(path: Path, spans: list[tuple[int, int, bytes]], end: int,
                 file_size: int) -> None:
    """Records lie before the central directory (at ``end``) and do not overlap (spans:
    start, end, name)."""
    spans.sort()  # already in order for files we write: linear
    previous_end, previous = 0, b""
    for start, stop, name in spans:
        if stop > end:
            where = (f"past the end of the file ({file_size} bytes)" if stop > file_size else
                     f"into the central directory at byte {end}")
            raise _refusal(path, f"zip record {_text(name, _UTF8_NAMES)!r} (offset {start}, "
                                 f"{stop - start} bytes with its header) reaches {where}")
        if start < previous_end:
            raise _refusal(path, f"zip records {_text(previous, _UTF8_NAMES)!r} and "
                                 f"{_text(name, _UTF8_NAMES)!r} overlap")
        previous_end, previous = stop, name
