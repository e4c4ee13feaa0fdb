"""The zip container ``torch.load`` reads, written in one sequential pass with large writes.

Layout (as ``torch.save`` writes it): records ``archive/data.pkl``, ``.format_version``,
``.storage_alignment``, ``byteorder``, ``data/<key>`` for every storage, ``version`` and
``.data/serialization_id``, all *stored* (uncompressed), each record's data starting at a multiple
of 64 bytes (a padding extra field, torch's ``FB`` id) so that ``torch.load(mmap=True)`` works.
Zip64 fields are written where sizes, offsets or the entry count need them.

Unlike ``torch.save`` the CRC-32 of every record is computed with ISA-L (the same CRC at 6-30x
zlib's speed) and written in the local header, so no data descriptors follow the data. The
CRC-32 of the whole file runs alongside: headers and small records are checksummed into it
again (cheaper than combining), larger records' CRCs are combined into it (``crc32_combine``),
so no large buffer is read twice. Every piece goes to ``file.write``; the file's buffer
(:data:`WRITE_BUFFER`) gathers headers and small records into large writes, and larger data
goes to the kernel straight from its memory.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, Final

import torch

from .integrity import crc32, crc32_combine
from .records import Pack, StorageRecord

__all__ = ["ALIGNMENT", "ARCHIVE", "DIRECT_FROM", "WRITE_BUFFER", "host_view", "write_torch_zip"]

ARCHIVE: Final = "archive"
ALIGNMENT: Final = 64
#: what ``torch.save`` records as its file format version and ``.format_version``
_FILE_FORMAT_VERSION: Final = b"3\n"
_PICKLE_FORMAT_VERSION: Final = b"1"
#: values from here on need zip64 fields (module constants, so tests can lower them)
_ZIP64_LIMIT = 0xFFFFFFFF
_ZIP64_COUNT_LIMIT = 0xFFFF
#: the buffer size nnhandler opens checkpoint files with: headers and small records are
#: gathered into writes this large; larger data goes to the kernel straight from its memory
WRITE_BUFFER: Final = 256 * 1024
#: from this size on a record's CRC is combined into the file's instead of computed twice
_COMBINE_FROM: Final = 8 * 1024
#: records this large have their block-aligned middle written past the page cache
DIRECT_FROM: Final = 256 * 1024
_BLOCK: Final = 4096
_O_DIRECT: Final = getattr(os, "O_DIRECT", 0)
_CPU: Final = torch.device("cpu")

_LOCAL: Final = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL: Final = struct.Struct("<4sHHHHHHIIIHHHHHII")
_EOCD64: Final = struct.Struct("<4sQHHIIQQQQ")
_EOCD64_LOCATOR: Final = struct.Struct("<4sIQI")
_EOCD_HEAD: Final = struct.Struct("<4sHHHHII")  # the end record without its comment length
_LOCAL_SIZE: Final = _LOCAL.size
_UTF8_NAMES: Final = 0x0800
_VERSION_PLAIN: Final = 20
_VERSION_ZIP64: Final = 45
_PREFIX: Final = f"{ARCHIVE}/".encode()


def _padding(length: int, alignment: int = ALIGNMENT) -> bytes:
    """An extra field (torch's ``FB`` id, filled with ``Z``) of ``length`` bytes, or of
    ``length + alignment`` where ``length`` cannot hold the field's 4-byte header."""
    if length == 0:
        return b""
    if length < 4:
        length += alignment
    return b"FB" + struct.pack("<H", length - 4) + b"Z" * (length - 4)


#: the padding extra field for each distance to the next alignment boundary
_PADDINGS: Final = tuple(_padding(length) for length in range(ALIGNMENT))


class _Direct:
    """Writes block-aligned ranges of the file past the page cache (``O_DIRECT``, Linux).

    Buffered writing copies every byte into the page cache (and the pages are freed again
    later): most of the CPU time a large write costs, taken from training while a background
    save runs. The aligned middle of each large record is written from its own memory instead,
    through a second descriptor of the same file; headers, small records and the unaligned
    ends go through ``file`` as before. Where the filesystem refuses ``O_DIRECT`` (tmpfs, some
    network filesystems) or an alignment, everything is written through ``file``.
    """

    __slots__ = ("_fd", "enabled", "name")

    def __init__(self, file: BinaryIO) -> None:
        self._fd: int | None = None
        name = getattr(file, "name", None)
        self.name = os.fspath(name) if isinstance(name, (str, bytes, os.PathLike)) else None
        self.enabled = bool(_O_DIRECT) and self.name is not None

    def write(self, data: memoryview, position: int) -> bool:
        """Write ``data`` (aligned memory, a whole number of blocks) at ``position`` (aligned);
        False (nothing written) where ``O_DIRECT`` is refused."""
        assert self.name is not None
        if self._fd is None:
            try:
                self._fd = os.open(self.name, os.O_WRONLY | _O_DIRECT | os.O_CLOEXEC)
            except OSError:  # EINVAL: the filesystem has no O_DIRECT; write through the file
                self.enabled = False
                return False
        written = 0
        try:
            while written < len(data):
                written += os.pwrite(self._fd, data[written:], position + written)
        except OSError as error:
            if error.errno != errno.EINVAL or written:
                raise  # ENOSPC, EIO …: the save fails like any other write
            self.enabled = False  # an alignment the device refuses
            return False
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _ZipOut:
    """Sequential zip output with a running CRC-32 of everything written.

    Every piece goes to ``file.write``: the file's own buffer (see :data:`WRITE_BUFFER`)
    gathers headers and small records into large writes, and larger data goes from its memory
    to the kernel without a copy in between; the aligned middle of records of
    :data:`DIRECT_FROM` bytes and more goes past the page cache (:class:`_Direct`).
    """

    __slots__ = ("_central", "_direct", "_file", "crc", "offset")

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._direct = _Direct(file)
        self._central: list[tuple[bytes, int, int, int]] = []
        self.offset = 0
        self.crc = 0

    def _put(self, data: bytes) -> None:
        self._file.write(data)
        self.crc = crc32(data, self.crc)
        self.offset += len(data)

    def add(self, name: bytes, data: Any, address: int = 0) -> None:
        """Append ``data`` (any contiguous buffer; in host memory at ``address`` if known) as a
        stored record ``name`` below the archive folder, its data starting on an ``ALIGNMENT``
        boundary (for a record written past the page cache: at the offset congruent to its
        address modulo the block size, so that memory and file blocks line up)."""
        size = memoryview(data).nbytes if type(data) is not bytes else len(data)
        direct = (size >= DIRECT_FROM and address % ALIGNMENT == 0 and address != 0
                  and self._direct.enabled)
        crc = crc32(data)
        data_offset = self._header(name, size, crc, address if direct else None)
        if direct:
            self._write_direct(memoryview(data).cast("B"), address, data_offset)
        else:
            self._file.write(data)
        # small data is checksummed again (cheaper than combining); large data is combined
        self.crc = crc32(data, self.crc) if size < _COMBINE_FROM else crc32_combine(self.crc,
                                                                                    crc, size)
        self.offset = data_offset + size

    def add_pack(self, name: bytes, pack: Pack) -> None:
        """Append the storages of ``pack`` end to end as one stored record ``name``, handed
        to the kernel from their own memory (``os.writev``) where ``file`` has a descriptor."""
        types = _ARRAY_TYPES
        views = []
        for storage in pack.storages:
            nbytes = storage.nbytes()
            kind = types.get(nbytes)
            if kind is None:
                if len(types) >= _ARRAY_TYPES_LIMIT:
                    types.clear()
                kind = types[nbytes] = ctypes.c_ubyte * nbytes
            views.append(kind.from_address(storage.data_ptr()))
        crc = 0
        for view in views:
            crc = crc32(view, crc)
        size = pack.nbytes
        data_offset = self._header(name, size, crc, None)
        _write_gathered(self._file, views, size)
        self.crc = crc32_combine(self.crc, crc, size)
        self.offset = data_offset + size

    def _header(self, name: bytes, size: int, crc: int, direct_address: int | None) -> int:
        """Write the local header of record ``name`` (``size`` bytes of CRC-32 ``crc``; its
        data at the offset congruent to ``direct_address`` modulo the block size when given,
        else on an ``ALIGNMENT`` boundary), its bytes counted into the file's CRC; returns the
        offset its data starts at."""
        encoded = _PREFIX + name
        offset = self.offset
        zip64 = size >= _ZIP64_LIMIT
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        start = offset + _LOCAL_SIZE + len(encoded) + len(extra)
        if direct_address is not None:
            extra += _padding((direct_address - start) % _BLOCK, _BLOCK)
        else:
            extra += _PADDINGS[-start % ALIGNMENT]
        stored = 0xFFFFFFFF if zip64 else size
        header = _LOCAL.pack(b"PK\x03\x04", _VERSION_ZIP64 if zip64 else _VERSION_PLAIN,
                             _UTF8_NAMES, 0, 0, 0, crc, stored, stored, len(encoded),
                             len(extra)) + encoded + extra
        self._central.append((encoded, crc, size, offset))
        self._file.write(header)
        self.crc = crc32(header, self.crc)
        return offset + len(header)

    def _write_direct(self, data: memoryview, address: int, data_offset: int) -> None:
        """Write ``data`` (at ``address`` in memory, ``data_offset`` in the file, congruent
        modulo the block size): the unaligned head and tail through the file, the aligned
        middle past the page cache."""
        head = -address % _BLOCK
        middle = (len(data) - head) // _BLOCK * _BLOCK
        file = self._file
        if middle <= 0:
            file.write(data)
            return
        if head:
            file.write(data[:head])
        file.flush()  # the file's position is the middle's start, on a block boundary
        if not self._direct.write(data[head:head + middle], data_offset + head):
            file.write(data[head:])
            return
        file.seek(data_offset + head + middle)
        if head + middle < len(data):
            file.write(data[head + middle:])

    def close(self) -> None:
        self._direct.close()

    def finish(self, comment_for: Callable[[int, int], bytes]) -> int:
        """Write the central directory and end records; the zip comment is
        ``comment_for(covered_size, crc)`` of everything before the comment-length field.
        Returns the file size."""
        directory_start = self.offset
        entries = []
        pack = _CENTRAL.pack
        for encoded, crc, size, offset in self._central:
            if size < _ZIP64_LIMIT and offset < _ZIP64_LIMIT:
                entries.append(pack(b"PK\x01\x02", _VERSION_PLAIN, _VERSION_PLAIN, _UTF8_NAMES,
                                    0, 0, 0, crc, size, size, len(encoded), 0, 0, 0, 0, 0,
                                    offset))
                entries.append(encoded)
                continue
            values = [value for value in (size, size, offset) if value >= _ZIP64_LIMIT]
            extra = struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values)
            entries.append(pack(
                b"PK\x01\x02", _VERSION_ZIP64, _VERSION_ZIP64, _UTF8_NAMES, 0, 0, 0, crc,
                size if size < _ZIP64_LIMIT else 0xFFFFFFFF,
                size if size < _ZIP64_LIMIT else 0xFFFFFFFF,
                len(encoded), len(extra), 0, 0, 0, 0,
                offset if offset < _ZIP64_LIMIT else 0xFFFFFFFF,
            ))
            entries.append(encoded + extra)
        self._put(b"".join(entries))
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
        comment = comment_for(self.offset, self.crc)
        if len(comment) > 0xFFFF:
            raise ValueError(f"a zip comment of {len(comment)} bytes exceeds 65535")
        self._put(struct.pack("<H", len(comment)) + comment)
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
    ``comment_for(covered_size, crc32)`` as its comment; returns the file size. ``file``
    should buffer (:data:`WRITE_BUFFER` bytes is what nnhandler opens it with)."""
    out = _ZipOut(file)
    try:
        out.add(b"data.pkl", pickled)
        out.add(b".format_version", _PICKLE_FORMAT_VERSION)
        out.add(b".storage_alignment", str(ALIGNMENT).encode())
        out.add(b"byteorder", sys.byteorder.encode())
        cpu = _CPU
        for key, storage in storages:
            name = b"data/" + key.encode()
            if isinstance(storage, Pack):
                out.add_pack(name, storage)
            elif type(storage) is memoryview:
                out.add(name, storage, _address(storage) if storage.nbytes >= DIRECT_FROM
                        else 0)
            elif storage.device == cpu:
                size, address = storage.nbytes(), storage.data_ptr()
                out.add(name, (ctypes.c_ubyte * size).from_address(address) if size else b"",
                        address)
            else:
                view, owner = host_view(storage)
                out.add(name, view, _address(view))
                del view, owner
        out.add(b"version", _FILE_FORMAT_VERSION)
        out.add(b".data/serialization_id", f"{secrets.randbits(128):040d}".encode())
        return out.finish(comment_for)
    finally:
        out.close()


#: byte array types by size, for views of packed storages (a state has few distinct sizes)
_ARRAY_TYPES: dict[int, Any] = {}
_ARRAY_TYPES_LIMIT: Final = 4096
#: buffers per ``os.writev`` call (``IOV_MAX`` on Linux and the BSDs)
_IOV_MAX: Final = 1024


def _write_gathered(file: BinaryIO, views: Sequence[Any], size: int) -> None:
    """Write ``views`` (``size`` bytes in all) at ``file``'s position: by ``os.writev`` from
    their memory where ``file`` has a descriptor (its buffer flushed first, its position moved
    past them after), else by ``file.write`` one after another (an in-memory file)."""
    try:
        fd = file.fileno()
    except (AttributeError, OSError):  # io.UnsupportedOperation is an OSError
        for view in views:
            file.write(view)
        return
    file.flush()
    start = file.tell()
    written = 0
    for first in range(0, len(views), _IOV_MAX):
        batch = views[first:first + _IOV_MAX]
        expected = sum(len(view) for view in batch)
        done = os.writev(fd, batch)
        if done < expected:  # a short write (a signal, a full disk): write the rest in turn
            _write_rest(fd, batch, done)
        written += expected
    assert written == size
    file.seek(start + size)


def _write_rest(fd: int, views: Sequence[Any], done: int) -> None:
    """Write what ``os.writev`` left of ``views`` after its first ``done`` bytes."""
    for view in views:
        data = memoryview(view).cast("B")
        if done >= len(data):
            done -= len(data)
            continue
        data = data[done:]
        done = 0
        while data:
            data = data[os.write(fd, data):]


def _address(view: memoryview) -> int:
    """Where ``view``'s bytes are (0 for read-only memory, which is never large here)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except TypeError:
        return 0
