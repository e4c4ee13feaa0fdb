"""One read of a checkpoint that also checks its CRC-32: the bytes are checked as they land.

``torch.load`` reads a file-like object through ``seek`` and ``readinto`` (its buffer adapter
hands ``readinto`` a view of the destination: a tensor storage's own memory). A
:class:`CheckingReader` serves those reads from an unbuffered file and computes the CRC-32 of every
large read on the destination itself, a cache-sized chunk at a time right after it was filled,
so the weights that come back are exactly the bytes that were checked and nothing is read
twice. At the end, :meth:`CheckingReader.file_crc32` puts the CRC of the whole covered file
together in file order: the large reads' CRCs joined with ``crc32_combine``, the bytes between
them (zip headers, the pickle, records smaller than :data:`LARGE_READ`) read once more and
checked there. A file of many small tensors is therefore read about twice, as before; the bulk
of a large checkpoint once.

Reads that overlap an earlier one (only a crafted local header makes torch read into bytes it
read already) are not used for the combined CRC; their bytes are read again as a gap, so every
covered byte is counted exactly once whatever the reads were.
"""

from __future__ import annotations

import io
import os
from typing import Final

from .integrity import crc32, crc32_combine

__all__ = ["LARGE_READ", "CheckingReader"]

#: reads of at least this many bytes are checked in the destination; smaller ones (headers,
#: small records) are checked by the gap pass, which costs less than a CRC call per read
LARGE_READ: Final = 64 * 1024
#: the CRC follows the read in chunks of this size, while the chunk is still in the cache
_CHUNK: Final = 256 * 1024
#: the buffer of the gap pass
_GAP_BUFFER: Final = 1024 * 1024


class CheckingReader:
    """A read-only binary file for ``torch.load`` that records the CRC-32 of its large reads
    (see the module docstring). Use as a context manager; it owns its descriptor."""

    __slots__ = ("_at", "_file", "_position", "_size", "_spans")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._file = io.FileIO(path, "r")
        try:
            self._size = os.fstat(self._file.fileno()).st_size
        except BaseException:
            self._file.close()
            raise
        self._position = 0
        self._at = 0  # where the file itself is (it is seeked only when a read starts elsewhere)
        #: ``(offset, length, crc32)`` of each large read
        self._spans: list[tuple[int, int, int]] = []

    def __enter__(self) -> CheckingReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            position = offset
        elif whence == os.SEEK_CUR:
            position = self._position + offset
        elif whence == os.SEEK_END:
            position = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence!r} (0, 1 or 2)")
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._position = position
        return position

    def read(self, size: int | None = -1) -> bytes:
        wanted = self._size - self._position if size is None or size < 0 else size
        buffer = bytearray(max(0, min(wanted, self._size - self._position)))
        count = self.readinto(buffer)
        return bytes(buffer[:count])

    def readinto(self, buffer: bytearray | memoryview) -> int:
        """Fill ``buffer`` from the current position (less only at the end of the file);
        a large read's CRC is computed on ``buffer`` as it is filled."""
        position = self._position
        if len(buffer) < LARGE_READ:
            count = self._read_at(memoryview(buffer), position)
        else:
            view = memoryview(buffer).cast("B")
            count = crc = 0
            while count < len(view):
                chunk = view[count:count + _CHUNK]
                filled = self._read_at(chunk, position + count)
                crc = crc32(chunk[:filled], crc)
                count += filled
                if filled < len(chunk):
                    break
            self._spans.append((position, count, crc))
        self._position = position + count
        return count

    def file_crc32(self, covered_size: int) -> tuple[int, int]:
        """``(bytes counted, CRC-32)`` of the file's first ``covered_size`` bytes: the large
        reads' CRCs in file order, the bytes between them read here. Fewer bytes than
        ``covered_size`` are counted only when the file is shorter."""
        crc = cursor = 0
        for start, length, span_crc in sorted(self._spans, key=lambda span: (span[0], -span[1])):
            end = start + length
            if start < cursor or end > covered_size or length == 0:
                continue  # overlapping or reaching past the covered part: a gap instead
            if start > cursor:
                counted, crc = self._gap_crc32(cursor, start, crc)
                if counted < start - cursor:
                    return cursor + counted, crc
            crc = crc32_combine(crc, span_crc, length)
            cursor = end
        counted, crc = self._gap_crc32(cursor, covered_size, crc)
        return cursor + counted, crc

    def _gap_crc32(self, start: int, end: int, crc: int) -> tuple[int, int]:
        buffer = memoryview(bytearray(min(_GAP_BUFFER, max(end - start, 1))))
        counted = 0
        while start + counted < end:
            chunk = buffer[:min(len(buffer), end - start - counted)]
            filled = self._read_at(chunk, start + counted)
            crc = crc32(chunk[:filled], crc)
            counted += filled
            if filled < len(chunk):
                break
        return counted, crc

    def _read_at(self, view: memoryview, offset: int) -> int:
        """Read into ``view`` from ``offset`` until it is full or the file ends; returns the
        bytes read."""
        file = self._file
        if self._at != offset:
            file.seek(offset)
        self._at = -1  # unknown until the reads below have succeeded
        count = 0
        while count < len(view):
            filled = file.readinto(view[count:])
            if not filled:
                break
            count += filled
        self._at = offset + count
        return count
