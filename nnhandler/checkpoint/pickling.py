"""Pickling an envelope the way ``torch.save`` does, only cheaper per tensor.

The pickle is the one ``torch.load`` (``weights_only=True`` included) reads: protocol 2, tensor
data in storages referenced by persistent ids ``("storage", StorageType, key, location, numel)``,
each tensor rebuilt by ``torch._utils._rebuild_tensor_v2`` (``_v3`` for dtypes without a legacy
storage class) from its storage, offset, size and stride. Storages are only collected here, to be
written by :mod:`.zipwriter` in large writes.

The bulk of a checkpoint (dicts, ``OrderedDict`` state dicts with their ``_metadata``, lists,
tuples, strings, numbers and plain strided CPU/CUDA tensors) is written by :class:`_Emitter`,
which appends ready-made opcode bytes: per tensor a cached persistent id per storage and a cached
tail per (offset, size, stride, ``requires_grad``) — about half of what ``pickle.Pickler`` with a
Python ``persistent_id`` and a reduction per tensor costs (the C pickler calls ``persistent_id``
for every object it meets). The emitter memoises only the functions it rebuilds with, at memo
indices ``0``-``3``. Everything else (``bytes``, ``torch.dtype``/``Size``/``device``,
parameters, tensors that are not plain — quantized, sparse, nested, conjugate or negative views,
tensors with Python attributes — and integers beyond 255 bytes) is pickled by one C pickler per
stream and spliced in without its ``PROTO`` header and ``STOP``; its memo is seeded so that its
indices start after the emitter's, so every memo index is stored once (``pickletools.dis``
accepts the stream). Backward hooks are written as ``None``, the value a fresh tensor has
(``torch.save`` writes an empty ``OrderedDict``).

Snapshots (:mod:`.snapshot`) put :class:`StagedTensor` placeholders in place of tensors: they
carry their pickled form, and their storages (host copies) come pre-registered.

This module reaches torch privates as it is imported (the rebuild functions, the dtype to
storage class map), so nothing imports it with ``nnhandler``: :mod:`.io` imports it when the
fast writer is first used, inside the self-check that decides whether the fast writer is used
at all (the torch.save writer is the fallback).
"""

from __future__ import annotations

import io
import pickle
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pickle import (
    BINFLOAT,
    BININT,
    BININT1,
    BININT2,
    BINPERSID,
    BINUNICODE,
    BUILD,
    EMPTY_DICT,
    EMPTY_LIST,
    EMPTY_TUPLE,
    GLOBAL,
    LONG1,
    MARK,
    NEWFALSE,
    NEWTRUE,
    NONE,
    REDUCE,
    SETITEMS,
    STOP,
    TUPLE,
    TUPLE1,
    TUPLE2,
    TUPLE3,
)
from typing import Any, Final

import torch
from torch._utils import _rebuild_parameter, _rebuild_tensor_v2, _rebuild_tensor_v3
from torch.serialization import location_tag

from .records import StagedTensor, StorageRecord, mixed_dtypes_error

__all__ = [
    "PICKLE_PROTOCOL",
    "StagedTensor",
    "StorageRecord",
    "StorageRef",
    "is_fast_tensor",
    "mixed_dtypes_error",
    "parameter_pieces",
    "pickle_with_storages",
    "storage_ref",
    "storage_type_of",
    "tensor_pieces",
]

#: ``torch.serialization.DEFAULT_PROTOCOL``: what ``torch.save`` writes
PICKLE_PROTOCOL: Final = 2
_TORCH_STORAGES: Final = (torch.storage.TypedStorage, torch.UntypedStorage)
_STORAGE_TYPES: Final[dict[torch.dtype, Any]] = {
    dtype: getattr(torch, name)
    for dtype, name in torch.storage._dtype_to_storage_type_map().items()
}
_STRIDED: Final = torch.strided
_APPENDS: Final = b"e"
_BINPUT: Final = b"q"
_BINGET: Final = b"h"
_BATCH: Final = 1000  # items per SETITEMS/APPENDS, as the C pickler batches them
_U32: Final = struct.Struct("<I")
_I32: Final = struct.Struct("<i")
_U16: Final = struct.Struct("<H")
_F64: Final = struct.Struct(">d")
#: integers up to this many bits fit LONG1 (255 bytes); longer ones go to the C pickler
_LONG1_BITS: Final = 8 * 255 - 1
_SMALL_INTS: Final = tuple(BININT1 + bytes([value]) for value in range(256))
#: tuples of up to three items close with one opcode, longer ones with MARK ... TUPLE
_TUPLE_ENDS: Final = (EMPTY_TUPLE, TUPLE1, TUPLE2, TUPLE3)


def _global(obj: Any) -> bytes:
    """The GLOBAL opcode that names ``obj`` (a class or function) as pickle does."""
    return GLOBAL + f"{obj.__module__}\n{obj.__qualname__}\n".encode()


#: the functions and classes the emitter names, by code (also their memo index)
REBUILD_V2: Final = 0
REBUILD_V3: Final = 1
REBUILD_PARAMETER: Final = 2
ORDERED_DICT: Final = 3
_GLOBALS: Final = tuple(_global(obj) + _BINPUT + bytes([code]) for code, obj in enumerate(
    (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter, OrderedDict)))
_GETS: Final = tuple(_BINGET + bytes([code]) for code in range(len(_GLOBALS)))
_NOTHING_DECLARED: Final = (False,) * len(_GLOBALS)
#: objects that hold the emitter's memo indices in the C pickler's memo (never pickled)
_MEMO_SEATS: Final = tuple(object() for _ in _GLOBALS)


def storage_type_of(dtype: torch.dtype) -> Any:
    """The storage class recorded for ``dtype``: its legacy typed storage, or
    ``torch.UntypedStorage`` for dtypes torch rebuilds with ``_rebuild_tensor_v3``."""
    return _STORAGE_TYPES.get(dtype, torch.UntypedStorage)


def is_fast_tensor(tensor: torch.Tensor) -> bool:
    """An exact ``torch.Tensor``, strided, on CPU or CUDA, without conjugate/negative bits or
    Python attributes: what the emitter writes itself."""
    return not (type(tensor) is not torch.Tensor or tensor.layout is not torch.strided
                or tensor.is_quantized or tensor.is_nested
                or not (tensor.is_cpu or tensor.is_cuda) or tensor.is_conj() or tensor.is_neg()
                or tensor.__dict__)


# -- opcode bytes of plain values ---------------------------------------------------------------
def _int(value: int) -> bytes:
    if 0 <= value < 256:
        return _SMALL_INTS[value]
    if 0 <= value < 65536:
        return BININT2 + _U16.pack(value)
    if -0x80000000 <= value < 0x80000000:
        return BININT + _I32.pack(value)
    encoded = pickle.encode_long(value)
    if len(encoded) >= 256:
        raise OverflowError("an integer this long is pickled by the C pickler")
    return LONG1 + bytes([len(encoded)]) + encoded


def _str(value: str) -> bytes:
    encoded = value.encode("utf-8", "surrogatepass")
    return BINUNICODE + _U32.pack(len(encoded)) + encoded


def _int_tuple(values: Sequence[int]) -> bytes:
    items = b"".join(_int(value) for value in values)
    if len(values) < 4:
        return items + _TUPLE_ENDS[len(values)]
    return MARK + items + TUPLE


class StorageRef:
    """A storage's persistent id: as a tuple (``pid``, for the C pickler's ``persistent_id``)
    and as the opcodes that start a tensor's arguments, push the id and load it (``marked``,
    for the emitter). Immutable and interned: see :func:`storage_ref`."""

    __slots__ = ("marked", "pid")

    def __init__(self, pid: tuple[str, Any, str, str, int]) -> None:
        _, storage_type, key, location, numel = pid
        self.pid = pid
        named = _STORAGE_GLOBALS.get(storage_type)
        if named is None:
            named = _STORAGE_GLOBALS[storage_type] = _PID_HEAD + _global(storage_type)
        self.marked = b"".join((MARK, named, _str(key), _str(location), _int(numel), TUPLE,
                                BINPERSID))


_PID_HEAD: Final = MARK + _str("storage")
#: storage class -> the start of a persistent id naming it
_STORAGE_GLOBALS: dict[Any, bytes] = {}
#: persistent id -> its reference, shared by every save in the process (a training run saves
#: the same storages again and again); cleared when it grows large
_REFS: dict[tuple[str, Any, str, str, int], StorageRef] = {}
_REFS_LIMIT: Final = 1 << 14


def storage_ref(storage_type: Any, key: str, location: str, numel: int) -> StorageRef:
    """The reference to storage ``key`` (``numel`` elements of ``storage_type`` at
    ``location``)."""
    pid = ("storage", storage_type, key, location, numel)
    ref = _REFS.get(pid)
    if ref is None:
        if len(_REFS) >= _REFS_LIMIT:
            _REFS.clear()
        ref = _REFS[pid] = StorageRef(pid)
    return ref


def tensor_pieces(ref: StorageRef, dtype: torch.dtype, offset: int | torch.SymInt,
                  shape: Sequence[int],
                  stride: Sequence[int], requires_grad: bool) -> tuple[int | bytes, ...]:
    """The pickled form of a plain tensor over ``ref``'s storage: the code of its rebuild
    function (see :data:`REBUILD_V2`) and the bytes of its arguments and ``REDUCE``."""
    tail = _tail(offset, shape, stride, requires_grad)
    if storage_type_of(dtype) is torch.UntypedStorage:
        dtype_global = GLOBAL + f"torch\n{str(dtype).removeprefix('torch.')}\n".encode()
        return (REBUILD_V3, ref.marked + tail[:-2] + dtype_global + TUPLE + REDUCE)
    return (REBUILD_V2, ref.marked + tail)


def parameter_pieces(data: tuple[int | bytes, ...],
                     requires_grad: bool) -> tuple[int | bytes, ...]:
    """The pickled form of an ``nn.Parameter`` whose data pickles as ``data``, as
    ``Parameter.__reduce_ex__`` writes it: ``_rebuild_parameter(data, requires_grad,
    OrderedDict())``."""
    return (REBUILD_PARAMETER, *data, NEWTRUE if requires_grad else NEWFALSE, ORDERED_DICT,
            EMPTY_TUPLE + REDUCE + TUPLE3 + REDUCE)


#: (offset, shape, stride, requires_grad) -> the bytes after a tensor's persistent id; shared by
#: every save in the process, and cleared when it grows large (a training run has few layouts)
_TAILS: dict[tuple[Any, Any, Any, bool], bytes] = {}
_TAILS_LIMIT: Final = 4096


def _tail(offset: int | torch.SymInt, shape: Sequence[int], stride: Sequence[int],
          requires_grad: bool) -> bytes:
    key = (offset, shape, stride, requires_grad)
    tail = _TAILS.get(key)
    if tail is None:
        tail = b"".join((_int(int(offset)), _int_tuple(shape), _int_tuple(stride),
                         NEWTRUE if requires_grad else NEWFALSE, NONE, TUPLE, REDUCE))
        if len(_TAILS) >= _TAILS_LIMIT:
            _TAILS.clear()
        _TAILS[key] = tail
    return tail


class _StorageTable:
    """Live storages by identity, keyed ``"0"``, ``"1"`` … in order of first use (after the
    keys of pre-registered snapshot records)."""

    __slots__ = ("_dtype_by_ptr", "_locations", "records", "refs")

    def __init__(self, staged: Sequence[StorageRecord]) -> None:
        self.records: list[StorageRecord] = list(staged)
        #: storage ``_cdata`` -> (the dtype it is recorded with, its reference)
        self.refs: dict[int, tuple[torch.dtype, StorageRef]] = {}
        self._dtype_by_ptr: dict[int, torch.dtype] = {}
        self._locations: dict[torch.device, str] = {}

    def ref(self, storage: torch.UntypedStorage, dtype: torch.dtype, storage_type: Any,
            numel: int) -> StorageRef:
        """The reference for ``storage`` seen as ``dtype``, registering it on first use."""
        cdata = storage._cdata
        known = self.refs.get(cdata)
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
        device = storage.device
        location = self._locations.get(device)
        if location is None:
            location = self._locations[device] = location_tag(storage)
        ref = storage_ref(storage_type, key, location, numel)
        self.refs[cdata] = (dtype, ref)
        self.records.append(StorageRecord(key, storage))
        return ref

    def tensor_ref(self, tensor: torch.Tensor) -> StorageRef:
        """The reference for the storage of a plain tensor (registered on first use)."""
        storage = tensor.untyped_storage()
        dtype = tensor.dtype
        storage_type = _STORAGE_TYPES.get(dtype)
        if storage_type is None:
            return self.ref(storage, torch.uint8, torch.UntypedStorage, storage.nbytes())
        return self.ref(storage, dtype, storage_type, storage.nbytes() // tensor.element_size())

    def storage_id(self, obj: Any) -> Any:
        """The persistent id of a storage object from torch's own reductions."""
        if isinstance(obj, torch.storage.TypedStorage):
            storage_type = getattr(torch, obj._pickle_storage_type())  # type: ignore[no-untyped-call]
            return self.ref(obj._untyped_storage, obj.dtype, storage_type,
                            obj._size()).pid  # type: ignore[no-untyped-call]
        return self.ref(obj, torch.uint8, torch.UntypedStorage, obj.nbytes()).pid

    def reduce_tensor(self, tensor: torch.Tensor) -> Any:
        """The reduction of an exact ``torch.Tensor`` met by the C pickler (inside a value the
        emitter hands over, e.g. a parameter's data)."""
        if not is_fast_tensor(tensor):
            return tensor.__reduce_ex__(PICKLE_PROTOCOL)  # type: ignore[no-untyped-call]
        ref = self.tensor_ref(tensor)
        dtype = tensor.dtype
        if dtype not in _STORAGE_TYPES:
            return (_rebuild_tensor_v3, (ref, tensor.storage_offset(), tuple(tensor.shape),
                                         tensor.stride(), tensor.requires_grad, None, dtype))
        return (_rebuild_tensor_v2, (ref, tensor.storage_offset(), tuple(tensor.shape),
                                     tensor.stride(), tensor.requires_grad, None))


class _Pickler(pickle.Pickler):
    """The C pickler, for the values the emitter hands over."""

    def __init__(self, file: io.BytesIO, table: _StorageTable) -> None:
        super().__init__(file, protocol=PICKLE_PROTOCOL)
        self._table = table
        self.dispatch_table = {torch.Tensor: table.reduce_tensor}

    def persistent_id(self, obj: Any) -> Any:  # called for every object: keep it short
        if type(obj) is StorageRef:
            return obj.pid
        if isinstance(obj, _TORCH_STORAGES):
            return self._table.storage_id(obj)
        return None


#: string -> its pickled form (the keys of state dicts recur in every save); shared by every
#: save in the process and cleared when it grows large
_STRINGS: dict[str, bytes] = {}
_STRINGS_LIMIT: Final = 1 << 14


class _Emitter:
    """Writes protocol-2 opcodes for plain data into ``parts`` (see the module docstring)."""

    __slots__ = ("_buffer", "_declared", "_pickler", "parts", "table")

    def __init__(self, table: _StorageTable) -> None:
        self.table = table
        self.parts: list[bytes] = []
        self._declared = list(_NOTHING_DECLARED)
        self._buffer: io.BytesIO | None = None
        self._pickler: _Pickler | None = None

    def emit(self, value: Any) -> None:
        _DISPATCH.get(type(value), _Emitter.other)(self, value)

    def named(self, code: int) -> None:
        """Push the function or class ``code`` (memoised after its first use)."""
        if self._declared[code]:
            self.parts.append(_GETS[code])
        else:
            self._declared[code] = True
            self.parts.append(_GLOBALS[code])

    def pieces(self, pieces: tuple[int | bytes, ...]) -> None:
        parts = self.parts
        for piece in pieces:
            if isinstance(piece, int):
                self.named(piece)
            else:
                parts.append(piece)

    def string(self, value: str) -> None:
        pickled = _STRINGS.get(value)
        if pickled is None:
            if len(_STRINGS) >= _STRINGS_LIMIT:
                _STRINGS.clear()
            pickled = _STRINGS[value] = _str(value)
        self.parts.append(pickled)

    def integer(self, value: int) -> None:
        if 0 <= value < 256:
            self.parts.append(_SMALL_INTS[value])
        elif value.bit_length() <= _LONG1_BITS:
            self.parts.append(_int(value))
        else:
            self.other(value)

    def floating(self, value: float) -> None:
        self.parts.append(BINFLOAT + _F64.pack(value))

    def boolean(self, value: bool) -> None:
        self.parts.append(NEWTRUE if value else NEWFALSE)

    def none(self, value: None) -> None:
        self.parts.append(NONE)

    def tensor(self, tensor: torch.Tensor) -> None:
        # is_fast_tensor(tensor), inlined: this runs for every tensor of every save
        if (tensor.__dict__ or tensor.layout is not _STRIDED or tensor.is_quantized
                or tensor.is_nested or not (tensor.is_cpu or tensor.is_cuda) or tensor.is_conj()
                or tensor.is_neg()):
            self.other(tensor)
            return
        dtype = tensor.dtype
        storage_type = _STORAGE_TYPES.get(dtype)
        if storage_type is None:
            self.pieces(tensor_pieces(self.table.tensor_ref(tensor), dtype,
                                      tensor.storage_offset(), tensor.shape, tensor.stride(),
                                      tensor.requires_grad))
            return
        storage = tensor.untyped_storage()
        known = self.table.refs.get(storage._cdata)
        if known is not None and known[0] is dtype:
            ref = known[1]
        else:
            ref = self.table.ref(storage, dtype, storage_type,
                                 storage.nbytes() // tensor.element_size())
        parts = self.parts
        if self._declared[REBUILD_V2]:
            parts.append(_GETS[REBUILD_V2])
        else:
            self.named(REBUILD_V2)
        parts.append(ref.marked)
        parts.append(_tail(tensor.storage_offset(), tensor.shape, tensor.stride(),
                           tensor.requires_grad))

    def staged(self, value: StagedTensor) -> None:
        self.pieces(value.pieces)

    def mapping(self, value: dict[Any, Any]) -> None:
        parts = self.parts
        parts.append(EMPTY_DICT)
        self._items(value)

    def _items(self, value: dict[Any, Any]) -> None:
        if not value:
            return
        parts = self.parts
        emit, string, tensor = self.emit, self.string, self.tensor
        parts.append(MARK)
        count = 0
        for key, item in value.items():
            if count == _BATCH:
                parts.append(SETITEMS)
                parts.append(MARK)
                count = 0
            count += 1
            if type(key) is str:
                string(key)
            else:
                emit(key)
            if type(item) is torch.Tensor:
                tensor(item)
            else:
                emit(item)
        parts.append(SETITEMS)

    def ordered(self, value: OrderedDict[Any, Any]) -> None:
        """As ``OrderedDict.__reduce__`` has it pickled: the class called with no arguments,
        the items, then its attributes (a state dict's ``_metadata``) through ``BUILD``."""
        self.named(ORDERED_DICT)
        self.parts.append(EMPTY_TUPLE + REDUCE)
        self._items(value)
        attributes = vars(value)
        if attributes:
            self.emit(dict(attributes))
            self.parts.append(BUILD)

    def list_of(self, value: list[Any]) -> None:
        parts = self.parts
        parts.append(EMPTY_LIST)
        if not value:
            return
        emit = self.emit
        for start in range(0, len(value), _BATCH):
            parts.append(MARK)
            for item in value[start:start + _BATCH]:
                emit(item)
            parts.append(_APPENDS)

    def tuple_of(self, value: tuple[Any, ...]) -> None:
        if len(value) > 3:
            self.parts.append(MARK)
        for item in value:
            self.emit(item)
        self.parts.append(_TUPLE_ENDS[len(value)] if len(value) < 4 else TUPLE)

    def other(self, value: Any) -> None:
        """Anything else: pickled by the C pickler and spliced in. One pickler serves the whole
        stream, its memo seeded with placeholders for the emitter's indices, so its own memo
        indices follow them and stay unique, and a piece may refer to what an earlier piece
        memoised."""
        pickler, buffer = self._pickler, self._buffer
        if pickler is None or buffer is None:
            buffer = self._buffer = io.BytesIO()
            pickler = self._pickler = _Pickler(buffer, self.table)
            pickler.memo = {id(seat): (code, seat) for code, seat in enumerate(_MEMO_SEATS)}
        buffer.seek(0)
        buffer.truncate()
        pickler.dump(value)
        self.parts.append(buffer.getvalue()[2:-1])  # without PROTO 2 and STOP


_DISPATCH: Final[dict[type, Callable[[_Emitter, Any], None]]] = {
    dict: _Emitter.mapping,
    torch.Tensor: _Emitter.tensor,
    str: _Emitter.string,
    int: _Emitter.integer,
    float: _Emitter.floating,
    bool: _Emitter.boolean,
    type(None): _Emitter.none,
    list: _Emitter.list_of,
    tuple: _Emitter.tuple_of,
    OrderedDict: _Emitter.ordered,
    StagedTensor: _Emitter.staged,
}


def pickle_with_storages(
    obj: Any, staged: Sequence[StorageRecord] = ()
) -> tuple[bytes, list[StorageRecord]]:
    """``data.pkl`` of ``obj`` and the storages it references, in key order.

    ``staged`` are the records of a snapshot's :class:`StagedTensor` placeholders (keys
    ``"0"`` … ``str(len(staged) - 1)``); storages of live tensors get the keys after them.
    """
    table = _StorageTable(staged)
    emitter = _Emitter(table)
    emitter.parts.append(b"\x80" + bytes([PICKLE_PROTOCOL]))
    emitter.emit(obj)
    emitter.parts.append(STOP)
    return b"".join(emitter.parts), table.records
