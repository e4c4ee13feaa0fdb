"""What the writers and the staging path share, free of torch privates (imported with
``nnhandler``; the fast writer's :mod:`.pickling` is imported only when it is first used).

:class:`StorageRecord` is one storage a checkpoint file holds; :class:`StagedTensor` is the
fast writer's stand-in for a snapshot's tensor (its pickled form, see :mod:`.pickling`);
:class:`Pack` is the content of a record that holds several small storages end to end (see
:mod:`.packing`).
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple

import torch

from ..errors import CheckpointError

__all__ = ["LEGACY_STORAGE_DTYPES", "Pack", "StagedTensor", "StorageRecord", "find_mixed_dtypes",
           "mixed_dtypes_error", "recorded_dtype"]

#: dtypes that ``torch.save`` records with a typed legacy storage class (``FloatStorage`` …);
#: storages of every other dtype are recorded as untyped bytes (``torch.uint8``). The torch.save
#: writer's snapshots check views of one storage against this list; the fast writer reads
#: torch's own map (``torch.storage._dtype_to_storage_type_map``) when it is first used.
LEGACY_STORAGE_DTYPES: Final = frozenset({
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
    torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4,
})


def recorded_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a storage of ``dtype`` tensors is recorded with (``torch.uint8`` for
    untyped storages)."""
    return dtype if dtype in LEGACY_STORAGE_DTYPES else torch.uint8


class Pack:
    """Several whole CPU storages of one dtype written end to end as one record, in order:
    the tensors over them are rebuilt as views of the record's storage at their offsets."""

    __slots__ = ("nbytes", "storages")

    def __init__(self) -> None:
        self.storages: list[torch.UntypedStorage] = []
        #: the bytes of all storages (each storage's offset is the sum of those before it)
        self.nbytes = 0


class StorageRecord(NamedTuple):
    """One storage to write as ``data/<key>``: a live storage, a snapshot's host bytes, or a
    :class:`Pack` of small storages."""

    key: str
    data: torch.UntypedStorage | memoryview | Pack


class StagedTensor:
    """A fast-writer snapshot's stand-in for a tensor whose data lies in host staging memory:
    ``pieces`` is its pickled form (see :func:`~.pickling.tensor_pieces`), which rebuilds the
    live tensor it was copied from."""

    __slots__ = ("pieces",)

    def __init__(self, pieces: tuple[int | bytes, ...]) -> None:
        self.pieces = pieces

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a StagedTensor is written by nnhandler's fast writer only, never "
                        "pickled (a snapshot is written by the writer it was taken for)")


def mixed_dtypes_error(first: torch.dtype, second: torch.dtype) -> CheckpointError:
    return CheckpointError(
        f"the state holds tensors that view the same memory as {first} and as {second}; "
        "a checkpoint (like torch.save) cannot store one storage with two dtypes: save a "
        "copy (.clone()) of one of them"
    )


def find_mixed_dtypes(value: Any) -> CheckpointError | None:
    """The error naming two dtypes that tensors inside ``value`` view one storage with (which
    no checkpoint can store), or ``None``."""
    seen: dict[int, torch.dtype] = {}
    pending = [value]  # a stack, children pushed in reverse: met in the order pickling meets them
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            pointer = storage.data_ptr()
            if pointer and storage.nbytes():
                dtype = recorded_dtype(item.dtype)
                first = seen.setdefault(pointer, dtype)
                if first is not dtype:
                    return mixed_dtypes_error(first, dtype)
        elif isinstance(item, dict):
            if type(item) is not dict:
                pending.extend(reversed(vars(item).values()))
            pending.extend(reversed(item.values()))
        elif isinstance(item, (list, tuple)):
            pending.extend(reversed(item))
    return None
