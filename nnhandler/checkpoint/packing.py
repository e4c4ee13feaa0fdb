"""Small storages packed into one record, and split apart again on load.

**Why.** Written one record each, a state of many small tensors (5,000 parameters of a few KB)
costs more per tensor than its bytes do: a zip record (local header, central directory entry,
CRC call, write call) and a storage key per tensor, ~5 µs of Python each, against ~2 µs for
writing 2 KB. So the fast writer (:mod:`.pickling`, :mod:`.zipwriter`) writes every *packable*
storage of a dtype into one record (:class:`~.records.Pack`), end to end, and pickles its
tensors as views of that record's storage at their offsets; the record's data is handed to
the kernel straight from the tensors' memory (``os.writev``), never copied in between.

**What is packed.** A CPU storage of a classic dtype (one with a legacy storage class, not
quantized) of fewer than :data:`PACK_BELOW` bytes (and more than none), viewed by exactly one
tensor of the saved state, which is contiguous, starts at the storage's first element, covers
all of it and does not require grad. Storages viewed by several tensors (tied weights, views)
are written as before, one record each, with their sharing as it was; so are parameters,
tensors that require grad, large, empty and device storages and tensors the C pickler writes.
Whether a storage is viewed once is known only at the end of the state, so the emitter leaves a
placeholder for a candidate's reference and fills it when the state is done (see
:func:`~.pickling.pickle_with_storages`).

**The file.** The envelope gains a top-level key :data:`PACKS_KEY`: a list of one tensor per
pack, spanning its whole storage, by which a reader knows the packs. ``torch.load(path,
weights_only=True)`` still opens the file with the same values (dtypes, shapes, strides); the
packed tensors are views of their pack (other storage offsets, one storage per pack).
``nnhandler`` readers (:func:`~.envelope.read_checkpoint`, hence :meth:`NNHandler.load
<nnhandler.NNHandler.load>`) call :func:`split_packs`: every tensor over a pack is replaced by a
clone, so the loaded state has exactly the storages ``torch.save`` would have given (one per
packed tensor, its own size, offset 0, shared with nothing), and no optimizer state or buffer
keeps a pack alive. Mapped reads (``mmap=True``, used only to check a file) keep the views.
Files without the key (written before, or by the torch.save writer) load as always.

**Cost on load.** The clones copy the packed bytes once more (small tensors only: each is
below :data:`PACK_BELOW`), ~1-2 µs per tensor plus the copy, less than the per-record cost the
pack saved ``torch.load``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final

import torch

from ..errors import CheckpointFormatError

__all__ = ["PACKED_DTYPES", "PACKS_KEY", "PACK_BELOW", "check_packs", "split_packs"]

#: the envelope's top-level key that lists the packs (one tensor over each pack's storage)
PACKS_KEY: Final = "packs"
#: storages of fewer bytes are packed; from here on a record's fixed cost is small beside its
#: bytes (the zip writer's ``DIRECT_FROM``, from which records go past the page cache)
PACK_BELOW: Final = 256 * 1024
#: the dtypes whose storages may be packed: real, not quantized, with a legacy storage class
#: (so a pack is rebuilt by ``_rebuild_tensor_v2`` like any tensor of its dtype)
PACKED_DTYPES: Final = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                        torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


def split_packs(envelope: Any, *, clone: bool = True) -> Any:
    """``envelope`` without :data:`PACKS_KEY`, every tensor over a pack replaced by a clone
    of its own (in place: the containers are those just unpickled). ``clone=False`` only
    drops the key (for a mapped read, whose tensors stay views of the file). An envelope
    without the key is returned as it is. The key is read from the file, so it is checked
    (:func:`check_packs`) before anything is cloned, and the tensors over each pack must tile
    it exactly, as the fast writer lays them out: otherwise a
    :class:`~nnhandler.CheckpointFormatError` naming the pack and the bytes."""
    if type(envelope) is not dict or PACKS_KEY not in envelope:
        return envelope
    packs = check_packs(envelope.pop(PACKS_KEY))
    if clone and packs:
        spans: dict[int, list[tuple[int, int]]] = {pointer: [] for pointer in packs}
        _unshare(envelope, spans)
        for pointer, (index, nbytes) in packs.items():
            _check_tiling(index, nbytes, spans[pointer])
    return envelope


def check_packs(packs: Any) -> dict[int, tuple[int, int]]:
    """The packs of ``packs`` (an envelope's :data:`PACKS_KEY` entry, untrusted) by storage
    address: (their index in the list, their bytes), once the entry is checked to be what the
    fast writer writes: a list of at most one tensor per dtype of :data:`PACKED_DTYPES`, each
    one-dimensional, at offset 0 and covering all of its storage, which is not empty. Anything
    else is a :class:`~nnhandler.CheckpointFormatError` naming the bad value."""
    if type(packs) is not list:
        raise CheckpointFormatError(f"the checkpoint's {PACKS_KEY!r} entry is not a list of "
                                    f"tensors: {type(packs).__qualname__}")
    found: dict[int, tuple[int, int]] = {}
    dtypes: set[torch.dtype] = set()
    for index, pack in enumerate(packs):
        where = f"the checkpoint's {PACKS_KEY!r} entry {index}"
        if type(pack) is not torch.Tensor:
            raise CheckpointFormatError(f"the checkpoint's {PACKS_KEY!r} entry is not a list of "
                                        f"tensors: item {index} is a {type(pack).__qualname__}")
        if pack.dtype not in PACKED_DTYPES:
            raise CheckpointFormatError(f"{where} has dtype {pack.dtype}, which is never packed")
        if pack.dtype in dtypes:  # one storage per key: two packs of a dtype never share one
            raise CheckpointFormatError(f"{where} is a second pack of dtype {pack.dtype}")
        dtypes.add(pack.dtype)
        nbytes = pack.untyped_storage().nbytes()
        if (pack.dim() != 1 or pack.storage_offset() != 0 or pack.stride() != (1,)
                or pack.nbytes != nbytes or nbytes == 0):
            raise CheckpointFormatError(
                f"{where} does not span its storage of {nbytes} bytes: shape "
                f"{tuple(pack.shape)}, stride {pack.stride()}, offset {pack.storage_offset()}")
        found[pack.untyped_storage().data_ptr()] = (index, nbytes)
    return found


def _check_tiling(index: int, nbytes: int, spans: list[tuple[int, int]]) -> None:
    """Check that ``spans`` (the byte ranges of the tensors over pack ``index`` of ``nbytes``
    bytes) cover it end to end, each byte once: so no two state tensors were views of one
    region (a crafted entry would otherwise split tied weights) and no bytes lie unused."""
    end = 0
    for first, last in sorted(spans):
        if first != end:
            problem = (f"bytes {first}-{last} overlap the tensor before them" if first < end
                       else f"bytes {end}-{first} are in no tensor")
            raise CheckpointFormatError(f"the tensors over the checkpoint's {PACKS_KEY!r} entry "
                                        f"{index} ({nbytes} bytes) do not tile it: {problem}")
        end = last
    if end != nbytes:
        raise CheckpointFormatError(f"the tensors over the checkpoint's {PACKS_KEY!r} entry "
                                    f"{index} ({nbytes} bytes) do not tile it: bytes "
                                    f"{end}-{nbytes} are in no tensor")


def _unshare(container: dict[Any, Any] | list[Any], spans: dict[int, list[tuple[int, int]]]
             ) -> None:
    """Replace, inside ``container``, every tensor over a pack (its storage's address a key
    of ``spans``) by a clone, its byte range noted in ``spans`` (tuples are rebuilt, dicts and
    lists changed in place). A tensor over a pack that is not contiguous is not one the fast
    writer packs: a :class:`~nnhandler.CheckpointFormatError`."""
    items = container.items() if isinstance(container, dict) else enumerate(container)
    for key, item in items:
        kind = type(item)
        if kind is torch.Tensor:
            found = spans.get(item.untyped_storage().data_ptr())
            if found is not None:
                if not item.is_contiguous():
                    raise CheckpointFormatError(
                        f"a tensor over a {PACKS_KEY!r} storage is not contiguous: shape "
                        f"{tuple(item.shape)}, stride {item.stride()}")
                first = item.storage_offset() * item.element_size()
                found.append((first, first + item.nbytes))
                container[key] = item.clone()
        elif kind is dict or kind is list:
            _unshare(item, spans)
        elif kind is OrderedDict:
            _unshare(item, spans)
            if vars(item):
                _unshare(vars(item), spans)
        elif kind is tuple:
            rebuilt = list(item)
            _unshare(rebuilt, spans)
            container[key] = tuple(rebuilt)
