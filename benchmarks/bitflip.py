"""Where a checkpoint keeps its tensors' bytes, and what a loader does with one flipped bit.

The peers section flips one bit in the middle of a tensor's data in a saved checkpoint (the
kind of damage a bad disk sector, a torn copy or a faulty network transfer leaves) and records
what loading it did. The data regions are found by reading each format's own layout:

* a ``torch.save`` file (zip): each stored ``*/data/N`` record;
* a safetensors file: the ``data_offsets`` of each tensor in its JSON header;
* a DCP directory: the byte range of each tensor item in the ``.distcp`` files (from the
  ``.metadata``), where each item is itself a small ``torch.save`` zip whose data record is
  located as above.

A directory checkpoint (Accelerate's, DCP's) contributes the regions of every file it holds.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from nnhandler import CheckpointError

__all__ = ["Region", "data_regions", "flip_bit", "flipped", "outcome_of"]

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra length
_ZIP_MAGIC = b"PK\x03\x04"
_DATA_RECORD = re.compile(r"(^|/)data/\d+$")
#: an error that says the bytes are damaged, from a loader without its own error class for it
_CORRUPTION_WORDS = re.compile(r"crc|checksum|corrupt", re.IGNORECASE)


@dataclass(frozen=True)
class Region:
    """``length`` bytes of one tensor's data at ``offset`` in ``path``."""

    path: Path
    offset: int
    length: int

    @property
    def middle(self) -> int:
        return self.offset + self.length // 2


def _zip_records(data: IO[bytes], base: int, path: Path) -> Iterator[Region]:
    """The stored data records of a zip read from ``data``, at file offsets ``base + ...``."""
    with zipfile.ZipFile(data) as archive:
        for info in archive.infolist():
            if not _DATA_RECORD.search(info.filename) or info.file_size == 0:
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: record {info.filename} is compressed; its bytes "
                                 "are not the tensor's")
            data.seek(info.header_offset)
            signature, name_length, extra_length = _LOCAL_HEADER.unpack(
                data.read(_LOCAL_HEADER.size))
            if signature != _ZIP_MAGIC:
                raise ValueError(f"{path}: no local header at {info.header_offset}")
            start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
            yield Region(path, base + start, info.file_size)


def _torch_file_regions(path: Path) -> Iterator[Region]:
    with open(path, "rb") as file:
        yield from _zip_records(file, 0, path)


def _safetensors_regions(path: Path) -> Iterator[Region]:
    with open(path, "rb") as file:
        (header_length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_length))
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        if end > begin:
            yield Region(path, 8 + header_length + begin, end - begin)


def _dcp_regions(directory: Path) -> Iterator[Region]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(directory)).read_metadata()
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata[index.fqn], TensorStorageMetadata):
            continue
        path = directory / info.relative_path
        with open(path, "rb") as file:
            file.seek(info.offset)
            item = file.read(info.length)
        if item.startswith(_ZIP_MAGIC):  # DCP's default: each tensor item is a torch.save
            yield from _zip_records(io.BytesIO(item), info.offset, path)
        else:  # raw tensor bytes
            yield Region(path, info.offset, info.length)


def data_regions(checkpoint: Path) -> list[Region]:
    """Every tensor data region of ``checkpoint`` (a file or a directory), largest first."""
    regions: list[Region] = []
    if checkpoint.is_dir():
        if (checkpoint / ".metadata").is_file():
            regions += _dcp_regions(checkpoint)
        for path in sorted(checkpoint.iterdir()):
            if path.suffix == ".safetensors":
                regions += _safetensors_regions(path)
            elif path.is_file() and zipfile.is_zipfile(path) and path.suffix != ".distcp":
                regions += _torch_file_regions(path)
    elif checkpoint.suffix == ".safetensors":
        regions += _safetensors_regions(checkpoint)
    else:
        regions += _torch_file_regions(checkpoint)
    if not regions:
        raise ValueError(f"{checkpoint}: no tensor data found in it")
    return sorted(regions, key=lambda region: (-region.length, str(region.path), region.offset))


def flip_bit(path: Path, offset: int, bit: int) -> None:
    """Invert bit ``bit`` (0-7) of the byte at ``offset`` of ``path``, in place (a second call
    undoes it)."""
    with open(path, "r+b") as file:
        file.seek(offset)
        (byte,) = file.read(1)
        file.seek(offset)
        file.write(bytes([byte ^ (1 << bit)]))


@contextmanager
def flipped(region: Region, bit: int) -> Iterator[Region]:
    """``with flipped(region, bit):`` bit ``bit`` of the middle byte of ``region`` is flipped
    inside the block and restored after it."""
    flip_bit(region.path, region.middle, bit)
    try:
        yield region
    finally:
        flip_bit(region.path, region.middle, bit)


def outcome_of(load: Callable[[], object], loaded_intact: Callable[[], bool]) -> str:
    """What ``load`` did with a damaged file: "detected" (it refused with an error that says
    the data is damaged: an nnhandler :class:`~nnhandler.CheckpointError`, or any error whose
    message names a CRC, checksum or corruption), "crashed (Type)" (any other error),
    "loaded silently wrong" (it returned and the state differs from what was saved) or
    "loaded intact" (it returned and the state is exactly what was saved: the flipped bytes
    were never used)."""
    try:
        load()
    except CheckpointError:
        return "detected"
    except Exception as error:
        return "detected" if _CORRUPTION_WORDS.search(str(error)) else (
            f"crashed ({type(error).__name__})")
    return "loaded intact" if loaded_intact() else "loaded silently wrong"
