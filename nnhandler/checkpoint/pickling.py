"""Pickling an envelope the way ``torch.save`` does, only cheaper per tensor.

The pickle is the one ``torch.load`` (``weights_only=True`` included) reads: tensor data lives in
storages referenced by persistent ids ``("storage", StorageType, key, location, numel)`` and each
tensor is rebuilt by ``torch._utils._rebuild_tensor_v2`` from its storage, offset, size and
stride. Two costs of ``torch.save`` go away: plain tensors are reduced by a short function (torch
builds a ``TypedStorage`` wrapper and pickles an empty ``OrderedDict`` of hooks per tensor — the
hooks are written as ``None``, the value a fresh tensor has), and storages are only collected
here, to be written by :mod:`.zipwriter` in large writes. Tensors that are not plain strided
CPU/CUDA tensors (subclasses other than a parameter's data, quantized, sparse, nested, meta,
conjugate or negative views, tensors with Python attributes) fall back to torch's own
``__reduce_ex__``, whose storages are registered the same way.

Snapshots (:mod:`.snapshot`) put :class:`StagedTensor` placeholders in place of tensors; they
carry their reduction, and their storages (host copies) come pre-registered.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import torch
from torch._utils import _rebuild_tensor_v2, _rebuild_tensor_v3
from torch.serialization import location_tag

from ..errors import CheckpointError

__all__ = [
    "PICKLE_PROTOCOL",
    "StagedTensor",
    "StorageRecord",
    "StorageRef",
    "is_fast_tensor",
    "mixed_dtypes_error",
    "pickle_with_storages",
    "storage_type_of",
]

#: ``torch.serialization.DEFAULT_PROTOCOL``: what ``torch.save`` writes
PICKLE_PROTOCOL: Final = 2
_TORCH_STORAGES: Final = (torch.storage.TypedStorage, torch.UntypedStorage)
_STORAGE_TYPES: Final[dict[torch.dtype, Any]] = {
    dtype: getattr(torch, name)
    for dtype, name in torch.storage._dtype_to_storage_type_map().items()
}


def storage_type_of(dtype: torch.dtype) -> Any:
    """The storage class recorded for ``dtype``: its legacy typed storage, or
    ``torch.UntypedStorage`` for dtypes torch rebuilds with ``_rebuild_tensor_v3``."""
    return _STORAGE_TYPES.get(dtype, torch.UntypedStorage)


def is_fast_tensor(tensor: torch.Tensor) -> bool:
    """An exact ``torch.Tensor``, strided, on CPU or CUDA, without conjugate/negative bits or
    Python attributes: what :func:`pickle_with_storages` reduces itself."""
    return not (type(tensor) is not torch.Tensor or tensor.layout is not torch.strided
                or tensor.is_quantized or tensor.is_nested
                or not (tensor.is_cpu or tensor.is_cuda) or tensor.is_conj() or tensor.is_neg()
                or tensor.__dict__)


@dataclass(frozen=True, slots=True)
class StorageRecord:
    """One storage to write as ``data/<key>``: a live storage, or a snapshot's host bytes."""

    key: str
    data: torch.UntypedStorage | memoryview


class StorageRef:
    """Stands in a tensor's reduction for its storage; pickled as its persistent id."""

    __slots__ = ("pid",)

    def __init__(self, pid: tuple[Any, ...]) -> None:
        self.pid = pid


class StagedTensor:
    """A snapshot's stand-in for a tensor whose data lies in host staging memory; pickled as
    ``reduction``, which rebuilds the live tensor it was copied from."""

    __slots__ = ("reduction",)

    def __init__(self, reduction: tuple[Any, tuple[Any, ...]]) -> None:
        self.reduction = reduction


def mixed_dtypes_error(first: torch.dtype, second: torch.dtype) -> CheckpointError:
    return CheckpointError(
        f"the state holds tensors that view the same memory as {first} and as {second}; "
        "a checkpoint (like torch.save) cannot store one storage with two dtypes: save a "
        "copy (.clone()) of one of them"
    )


class _StorageTable:
    """Live storages by identity, keyed ``"0"``, ``"1"`` … in order of first use (after the
    keys of pre-registered snapshot records)."""

    __slots__ = ("_dtype_by_ptr", "_refs", "_tags", "records")

    def __init__(self, staged: Sequence[StorageRecord]) -> None:
        self.records: list[StorageRecord] = list(staged)
        self._refs: dict[int, tuple[torch.dtype, StorageRef]] = {}
        self._dtype_by_ptr: dict[int, torch.dtype] = {}
        self._tags: dict[torch.device, str] = {}

    def ref(self, storage: torch.UntypedStorage, dtype: torch.dtype, storage_type: Any,
            numel: int) -> StorageRef:
        """The reference for ``storage`` seen as ``dtype``, registering it on first use."""
        cdata = storage._cdata
        known = self._refs.get(cdata)
        if known is not None:
            if known[0] is not dtype:
                raise mixed_dtypes_error(known[0], dtype)
            return known[1]
        ptr = storage.data_ptr()
        if ptr:  # torch refuses two storage objects over the same memory with different dtypes
            seen = self._dtype_by_ptr.setdefault(ptr, dtype)
            if seen is not dtype:
                raise mixed_dtypes_error(seen, dtype)
        key = str(len(self.records))
        ref = StorageRef(("storage", storage_type, key, self._location(storage), numel))
        self._refs[cdata] = (dtype, ref)
        self.records.append(StorageRecord(key, storage))
        return ref

    def _location(self, storage: torch.UntypedStorage) -> str:
        device = storage.device
        tag = self._tags.get(device)
        if tag is None:
            tag = self._tags[device] = location_tag(storage)
        return tag

    def storage_id(self, obj: Any) -> Any:
        """The persistent id of a storage object from torch's own reductions."""
        if isinstance(obj, torch.storage.TypedStorage):
            storage_type = getattr(torch, obj._pickle_storage_type())  # type: ignore[no-untyped-call]
            return self.ref(obj._untyped_storage, obj.dtype, storage_type,
                            obj._size()).pid  # type: ignore[no-untyped-call]
        return self.ref(obj, torch.uint8, torch.UntypedStorage, obj.nbytes()).pid

    def reduce_tensor(self, tensor: torch.Tensor) -> Any:
        """The reduction of an exact ``torch.Tensor`` (``dispatch_table`` is keyed by exact type,
        so parameters and subclasses never come here; a parameter's data does)."""
        if not is_fast_tensor(tensor):
            return tensor.__reduce_ex__(PICKLE_PROTOCOL)  # type: ignore[no-untyped-call]
        storage = tensor.untyped_storage()
        dtype = tensor.dtype
        storage_type = _STORAGE_TYPES.get(dtype)
        if storage_type is None:
            ref = self.ref(storage, torch.uint8, torch.UntypedStorage, storage.nbytes())
            return (_rebuild_tensor_v3, (ref, tensor.storage_offset(), tuple(tensor.shape),
                                         tensor.stride(), tensor.requires_grad, None, dtype))
        ref = self.ref(storage, dtype, storage_type, storage.nbytes() // tensor.element_size())
        return (_rebuild_tensor_v2, (ref, tensor.storage_offset(), tuple(tensor.shape),
                                     tensor.stride(), tensor.requires_grad, None))


def _staged_reduction(placeholder: StagedTensor) -> tuple[Any, tuple[Any, ...]]:
    return placeholder.reduction


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, table: _StorageTable) -> None:
        super().__init__(file, protocol=PICKLE_PROTOCOL)
        self._table = table
        self.dispatch_table = {torch.Tensor: table.reduce_tensor,
                               StagedTensor: _staged_reduction}

    def persistent_id(self, obj: Any) -> Any:  # called for every object: keep it short
        if type(obj) is StorageRef:
            return obj.pid
        if isinstance(obj, _TORCH_STORAGES):
            return self._table.storage_id(obj)
        return None


def pickle_with_storages(
    obj: Any, staged: Sequence[StorageRecord] = ()
) -> tuple[bytes, list[StorageRecord]]:
    """``data.pkl`` of ``obj`` and the storages it references, in key order.

    ``staged`` are the records of a snapshot's :class:`StagedTensor` placeholders (keys
    ``"0"`` … ``str(len(staged) - 1)``); storages of live tensors get the keys after them.
    """
    table = _StorageTable(staged)
    buffer = io.BytesIO()
    _Pickler(buffer, table).dump(obj)
    return buffer.getvalue(), table.records
