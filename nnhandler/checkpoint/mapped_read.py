"""A verified read that copies the model's bytes once: from the file's mapping into the model.

``NNHandler.load`` and ``resume_from`` hand the model's tensors to ``module.load_state_dict``,
which copies them into the live parameters and buffers. Read into fresh memory first (what
``torch.load(path)`` does, and :class:`~.verified_read.CheckingReader`), every byte of the
model is copied twice and the fresh memory is faulted in page by page; that read, not the
CRC-32, is most of what a load costs. ``read_checkpoint(..., copied=...)`` instead

1. checks the zip layout (:mod:`.ziplayout`: nothing compressed, nothing outside the file)
   and opens the file with ``torch.load(weights_only=True, mmap=True)``, so every storage is
   a view of one mapping of the file (a file that fails to open is checked in full, so that
   damage is reported as damage);
2. checks the CRC-32 of the whole covered file *through that mapping*
   (:func:`crc32_through_storages`): each data record's bytes where torch mapped them (the
   pages the CRC faults in are the ones the load then copies from; ISA-L's CRC runs on the
   page cache's pages at ~11 GB/s per core, which is its compute speed, not memory's), the
   zip headers and the pickle read from the file. From :data:`PARALLEL_FROM` bytes the work
   is cut into one piece per free core, whose CRCs are combined (ISA-L releases the GIL).
   Where the storages do not match the data records one to one (a record no tensor uses, a
   ``map_location`` that moved them), and before any mismatch is reported, the CRC is
   computed on a read-only mapping of its own (:func:`mapped_crc32`): the file decides. A
   damaged file fails here, before any tensor is copied off the mapping;
3. clones off the mapping, storage by storage (tensors that shared a storage still share
   one), every CPU tensor that is not under one of the ``copied`` state keys — the keys whose
   tensors the caller copies into live tensors and then drops. Those stay mapped until
   copied; everything else (optimizer moments, callbacks' tensors, states nothing owns, which
   are kept) lives in memory of its own, as after ``torch.load(path)``.

The bytes copied into the model are the pages whose CRC was checked (the same page cache).
The window between the check and the copy is the one any verify-then-read has: a file
rewritten *in place* by another process meanwhile is not noticed (nnhandler never rewrites a
checkpoint in place: every write goes to a temporary file that is renamed), and a file
truncated meanwhile by another process stops this one with ``SIGBUS``, as with
``torch.load(mmap=True)``. Where the file cannot be mapped (:func:`can_map`), it is read with
the checking reader instead (still verified, in one read).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections import OrderedDict
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import torch

from .integrity import crc32, crc32_combine
from .packing import PACKS_KEY

__all__ = ["PARALLEL_FROM", "can_map", "crc32_through_storages", "detach_from_file", "mapped_crc32",
           "parallel_crc32"]

#: bytes from which the CRC is split across cores (below, a thread's start costs more than
#: it saves); at most :data:`_MOST_PIECES` pieces (memory bandwidth is shared beyond)
PARALLEL_FROM: Final = 32 * 1024 * 1024
_MOST_PIECES: Final = 4


def can_map(path: Path) -> bool:
    """Whether ``path`` can be mapped read-only (some network and FUSE file systems cannot)."""
    try:
        with open(path, "rb") as file:
            mmap.mmap(file.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ).close()
    except (OSError, ValueError):  # ValueError: an empty file
        return False
    return True


def mapped_crc32(path: Path, covered_size: int) -> tuple[int, int]:
    """``(bytes counted, CRC-32)`` of the first ``covered_size`` bytes of ``path``, computed on
    a read-only shared mapping (populated by the kernel in one go). Raises ``OSError`` where
    the file cannot be mapped."""
    with open(path, "rb") as file:
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapping = mmap.mmap(file.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
    try:
        view = memoryview(mapping)
        try:
            covered = view[:covered_size]
            return len(covered), parallel_crc32(covered)
        finally:
            covered.release()
            view.release()
    finally:
        mapping.close()


def crc32_through_storages(path: Path, covered_size: int, envelope: Any) -> tuple[int, int] | None:
    """``(bytes counted, CRC-32)`` of the first ``covered_size`` bytes of ``path``, where
    ``envelope`` was just read from it with ``torch.load(mmap=True)``: each data record's bytes
    are read where torch mapped them (the envelope's CPU storages, so the pages the CRC faults
    in are the ones the load then copies from), every other byte from the file. ``None`` where
    the storages do not match the file's data records one to one at one mapping base (a
    ``map_location`` moved them, a record no tensor uses, a size that differs): the caller
    then checks a mapping of its own (:func:`mapped_crc32`)."""
    storages = _cpu_storages(envelope, {})
    if not storages:
        return None
    reader = torch._C.PyTorchFileReader(str(path))
    records = sorted((reader.get_record_offset(name),  # type: ignore[attr-defined]
                      reader.get_record_size(name))
                     for name in reader.get_all_records() if name.startswith("data/"))
    records = [(offset, size) for offset, size in records if size]
    mapped = sorted((storage.data_ptr(), storage.nbytes()) for storage in storages.values())
    if len(records) != len(mapped):
        return None
    base = mapped[0][0] - records[0][0]
    if any(pointer - offset != base or size != nbytes or offset + size > covered_size
           for (offset, size), (pointer, nbytes) in zip(records, mapped, strict=True)):
        return None
    pieces: list[memoryview | bytes] = []
    position = 0
    with open(path, "rb", buffering=0) as file:
        for offset, size in records:
            if offset < position:
                return None
            pieces.append(os.pread(file.fileno(), offset - position, position))
            pieces.append(memoryview((ctypes.c_char * size).from_address(base + offset)))
            position = offset + size
        pieces.append(os.pread(file.fileno(), covered_size - position, position))
    counted = sum(len(piece) for piece in pieces)
    return counted, _pieces_crc32(pieces, counted)


def _cpu_storages(value: Any, found: dict[int, torch.UntypedStorage]
                  ) -> dict[int, torch.UntypedStorage]:
    """The distinct non-empty CPU storages of the tensors in ``value``, by address."""
    kind = type(value)
    if kind is torch.Tensor or kind is torch.nn.Parameter:
        if value.device.type == "cpu" and value.layout is torch.strided:
            storage = value.untyped_storage()
            if storage.nbytes():
                found.setdefault(storage.data_ptr(), storage)
    elif kind is dict or kind is OrderedDict or kind is list or kind is tuple:
        for item in value.values() if kind is dict or kind is OrderedDict else value:
            _cpu_storages(item, found)
    return found


def _pieces_crc32(pieces: list[memoryview | bytes], total: int) -> int:
    """The CRC-32 of ``pieces`` joined (``total`` bytes): from :data:`PARALLEL_FROM` bytes
    cut into parts of at most a core's share, computed on one thread per core this process
    may run on (at most :data:`_MOST_PIECES`; ISA-L releases the GIL), combined in order."""
    workers = min(_MOST_PIECES, len(os.sched_getaffinity(0)), max(1, total // (PARALLEL_FROM // 2)))
    if total < PARALLEL_FROM or workers < 2:
        combined = 0
        for piece in pieces:
            combined = crc32(piece, combined)
        return combined
    most = -(-total // workers)
    cut = [view[start:start + most] for piece in pieces if len(piece)
           for view in [memoryview(piece)] for start in range(0, len(view), most)]
    # one thread per core taking the parts in turn: the records cut above are uneven in size
    with ThreadPoolExecutor(workers, thread_name_prefix="nnhandler-crc") as pool:
        crcs = list(pool.map(crc32, cut))
    combined = crcs[0]
    for view, crc in zip(cut[1:], crcs[1:], strict=True):
        combined = crc32_combine(combined, crc, len(view))
    return combined


def parallel_crc32(data: memoryview) -> int:
    """``crc32(data)``, computed in one piece per core this process may run on (at most
    :data:`_MOST_PIECES`) when ``data`` is :data:`PARALLEL_FROM` bytes or more."""
    return _pieces_crc32([data], len(data))


def detach_from_file(envelope: dict[str, Any], copied: Collection[str]) -> None:
    """Replace, in place, every CPU tensor of ``envelope`` (read with ``mmap=True``) by one over
    a storage of its own, except the tensors under the state keys in ``copied`` and those
    over a pack (:func:`~.packing.split_packs` clones them apart, one by one). Tensors that
    shared a storage share its clone."""
    packs = envelope.get(PACKS_KEY)
    skip = {pack.untyped_storage().data_ptr() for pack in packs
            if type(pack) is torch.Tensor} if type(packs) is list else set()
    clones: dict[int, torch.UntypedStorage] = {}
    for key, value in envelope.items():
        if key == "state" and type(value) is dict:
            for state_key, state in value.items():
                if state_key not in copied:
                    value[state_key] = _detached(state, skip, clones)
        elif key != PACKS_KEY:
            envelope[key] = _detached(value, skip, clones)


def _detached(value: Any, skip: set[int], clones: dict[int, torch.UntypedStorage]) -> Any:
    kind = type(value)
    if kind is torch.Tensor or kind is torch.nn.Parameter:
        return _own_storage(value, skip, clones)
    if kind is dict or kind is OrderedDict or kind is list:
        items = value.items() if kind is not list else enumerate(value)
        for key, item in items:
            value[key] = _detached(item, skip, clones)
        if kind is OrderedDict and vars(value):  # a state dict's ``_metadata``
            for name, item in vars(value).items():
                setattr(value, name, _detached(item, skip, clones))
        return value
    if kind is tuple:
        return tuple(_detached(item, skip, clones) for item in value)
    return value


def _own_storage(tensor: torch.Tensor, skip: set[int],
                 clones: dict[int, torch.UntypedStorage]) -> torch.Tensor:
    if tensor.device.type != "cpu":  # map_location moved it: it is not the file's any more
        return tensor
    if tensor.layout is not torch.strided or tensor.is_quantized:
        rebuilt = tensor.clone()  # no storage to share: weights_only rebuilds these whole
    else:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer in skip:
            return tensor
        clone = clones.get(pointer)
        if clone is None:
            clone = torch.empty(storage.nbytes(), dtype=torch.uint8).untyped_storage()
            clones[pointer] = clone.copy_(storage)
        rebuilt = torch.empty((0,), dtype=tensor.dtype).set_(
            clone, tensor.storage_offset(), tensor.size(), tensor.stride())
    if type(tensor) is torch.nn.Parameter:
        return torch.nn.Parameter(rebuilt, requires_grad=tensor.requires_grad)
    return rebuilt
