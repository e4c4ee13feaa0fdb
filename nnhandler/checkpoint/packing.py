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

__all__ = ["PACKS_KEY", "PACK_BELOW", "split_packs"]

#: the envelope's top-level key that lists the packs (one tensor over each pack's storage)
PACKS_KEY: Final = "packs"
#: storages of fewer bytes are packed; from here on a record's fixed cost is small beside its
#: bytes (the zip writer's ``DIRECT_FROM``, from which records go past the page cache)
PACK_BELOW: Final = 256 * 1024


def split_packs(envelope: Any, *, clone: bool = True) -> Any:
    """``envelope`` without :data:`PACKS_KEY`, every tensor over a pack replaced by a clone
    of its own (in place: the containers are those just unpickled). ``clone=False`` only
    drops the key (for a mapped read, whose tensors stay views of the file). An envelope
    without the key is returned as it is; a key that is not a list of tensors is a
    :class:`~nnhandler.CheckpointFormatError`."""
    if type(envelope) is not dict or PACKS_KEY not in envelope:
        return envelope
    packs = envelope.pop(PACKS_KEY)
    if type(packs) is not list or not all(type(pack) is torch.Tensor for pack in packs):
        raise CheckpointFormatError(f"the checkpoint's {PACKS_KEY!r} entry is not a list of "
                                    f"tensors: {type(packs).__qualname__}")
    if clone:
        pointers = {pack.untyped_storage().data_ptr() for pack in packs}
        pointers.discard(0)
        if pointers:
            _unshare(envelope, pointers)
    return envelope


def _unshare(container: dict[Any, Any] | list[Any], pointers: set[int]) -> None:
    """Replace, inside ``container``, every tensor whose storage is at one of ``pointers``
    by a clone (tuples are rebuilt, dicts and lists changed in place)."""
    items = container.items() if isinstance(container, dict) else enumerate(container)
    for key, item in items:
        kind = type(item)
        if kind is torch.Tensor:
            if item.untyped_storage().data_ptr() in pointers:
                container[key] = item.clone()
        elif kind is dict or kind is list:
            _unshare(item, pointers)
        elif kind is OrderedDict:
            _unshare(item, pointers)
            if vars(item):
                _unshare(vars(item), pointers)
        elif kind is tuple:
            rebuilt = list(item)
            _unshare(rebuilt, pointers)
            container[key] = tuple(rebuilt)
