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
    BININT2,
    BUILD,
    EMPTY_DICT,
    EMPTY_LIST,
    EMPTY_TUPLE,
    GLOBAL,
    MARK,
    NEWFALSE,
    NEWTRUE,
    NONE,
    REDUCE,
    SETITEMS,
    STOP,
    TUPLE,
    TUPLE3,
)
from typing import Any, Final

import torch
from torch._utils import _rebuild_parameter, _rebuild_tensor_v2, _rebuild_tensor_v3
from torch.serialization import location_tag

from .opcodes import (
    SMALL_INTS,
    TUPLE_ENDS,
    StorageRef,
    encode_global,
    encode_int,
    encode_str,
    storage_ref,
    tensor_tail,
)
from .packing import PACK_BELOW, PACKED_DTYPES, PACKS_KEY
from .records import Pack, StagedTensor, StorageRecord, mixed_dtypes_error

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
_F64: Final = struct.Struct(">d")
_U16: Final = struct.Struct("<H")
#: integers up to this many bits fit LONG1 (255 bytes); longer ones go to the C pickler
_LONG1_BITS: Final = 8 * 255 - 1
#: the functions and classes the emitter names, by code (also their memo index)
REBUILD_V2: Final = 0
REBUILD_V3: Final = 1
REBUILD_PARAMETER: Final = 2
ORDERED_DICT: Final = 3
_GLOBALS: Final = tuple(encode_global(obj) + _BINPUT + bytes([code]) for code, obj in enumerate(
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


def tensor_pieces(ref: StorageRef, dtype: torch.dtype, offset: int | torch.SymInt,
                  shape: Sequence[int],
                  stride: Sequence[int], requires_grad: bool) -> tuple[int | bytes, ...]:
    """The pickled form of a plain tensor over ``ref``'s storage: the code of its rebuild
    function (see :data:`REBUILD_V2`) and the bytes of its arguments and ``REDUCE``."""
    tail = tensor_tail(offset, shape, stride, requires_grad)
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


class _StorageTable:
    """Live storages by identity, keyed ``"0"``, ``"1"`` … in order of first use (after the
    keys of pre-registered snapshot records)."""

    __slots__ = ("_dtype_by_ptr", "_locations", "held", "parts", "records", "refs")

    def __init__(self, staged: Sequence[StorageRecord], parts: list[bytes],
                 pack: bool = False) -> None:
        self.records: list[StorageRecord] = list(staged)
        #: storage ``_cdata`` -> (the dtype it is recorded with, its reference)
        self.refs: dict[int, tuple[torch.dtype, StorageRef]] = {}
        self._dtype_by_ptr: dict[int, torch.dtype] = {}
        self._locations: dict[torch.device, str] = {}
        #: the emitter's output, where the placeholders of held storages are filled in
        self.parts = parts
        #: with packing, the storages that may be packed (see :mod:`.packing`), held until the
        #: state is done: ``_cdata`` -> (the index in ``parts`` of the placeholder for their
        #: tensor's reference, the tensor, the storage, its bytes, the dtype). Any other use
        #: of a held storage, by whatever path it is met (a second view, a parameter, the C
        #: pickler), registers it in :meth:`ref` and so writes it as a record of its own.
        self.held: dict[int, tuple[int, torch.Tensor, torch.UntypedStorage, int, torch.dtype]
                        ] | None = {} if pack else None

    def ref(self, storage: torch.UntypedStorage, dtype: torch.dtype, storage_type: Any,
            numel: int) -> StorageRef:
        """The reference for ``storage`` seen as ``dtype``, registering it on first use."""
        cdata = storage._cdata
        known = self.refs.get(cdata)
        if known is not None:
            if known[0] is not dtype:
                raise mixed_dtypes_error(known[0], dtype)
            return known[1]
        held = self.held
        first = held.pop(cdata, None) if held else None
        if first is not None and first[4] is not dtype:
            raise mixed_dtypes_error(first[4], dtype)
        self.claim(storage.data_ptr(), dtype)
        key = str(len(self.records))
        ref = storage_ref(storage_type, key, self.location(storage), numel)
        self.refs[cdata] = (dtype, ref)
        self.records.append(StorageRecord(key, storage))
        if first is not None:  # the held tensor was the storage's first use: it views it whole
            index, tensor = first[0], first[1]
            self.parts[index] = ref.marked + tensor_tail(0, tensor.shape, tensor.stride(), False)
        return ref

    def claim(self, ptr: int, dtype: torch.dtype) -> None:
        """Note that the memory at ``ptr`` is written as ``dtype``: torch refuses two storage
        objects over the same memory with different dtypes, and so do we."""
        if ptr:
            seen = self._dtype_by_ptr.setdefault(ptr, dtype)
            if seen is not dtype:
                raise mixed_dtypes_error(seen, dtype)

    def location(self, storage: torch.UntypedStorage) -> str:
        """``storage``'s location tag (``"cpu"``, ``"cuda:0"`` …)."""
        device = storage.device
        location = self._locations.get(device)
        if location is None:
            location = self._locations[device] = location_tag(storage)
        return location

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
            untyped = obj._untyped_storage
            return self.ref(untyped, obj.dtype, storage_type,
                            untyped.nbytes() // obj.dtype.itemsize).pid
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


#: dtypes whose tensors the emitter writes without asking for conjugate bits or quantization
#: (neither exists for them) and may pack: real, non-quantized, with a legacy storage class
_PLAIN_TYPES: Final[dict[torch.dtype, Any]] = {
    dtype: _STORAGE_TYPES[dtype] for dtype in PACKED_DTYPES}
_ELEMENT_SIZES: Final = {dtype: torch.empty(0, dtype=dtype).element_size()
                         for dtype in _PLAIN_TYPES}


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
        self.parts = table.parts
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
            pickled = _STRINGS[value] = encode_str(value)
        self.parts.append(pickled)

    def integer(self, value: int) -> None:
        if 0 <= value < 256:
            self.parts.append(SMALL_INTS[value])
        elif value.bit_length() <= _LONG1_BITS:
            self.parts.append(encode_int(value))
        else:
            self.other(value)

    def floating(self, value: float) -> None:
        self.parts.append(BINFLOAT + _F64.pack(value))

    def boolean(self, value: bool) -> None:
        self.parts.append(NEWTRUE if value else NEWFALSE)

    def none(self, value: None) -> None:
        self.parts.append(NONE)

    def tensor(self, tensor: torch.Tensor) -> None:
        # is_fast_tensor(tensor), inlined: this runs for every tensor of every save; the
        # conjugate and quantized checks only where the dtype allows them (_unusual)
        if tensor.__dict__ or tensor.layout is not _STRIDED or tensor.is_nested or tensor.is_neg():
            self.other(tensor)
            return
        dtype = tensor.dtype
        storage_type = _PLAIN_TYPES.get(dtype)
        if storage_type is None:
            self._unusual(tensor, dtype)
            return
        cpu = tensor.is_cpu
        if not cpu and not tensor.is_cuda:
            self.other(tensor)
            return
        storage = tensor.untyped_storage()
        cdata = storage._cdata
        table = self.table
        known = table.refs.get(cdata)
        parts = self.parts
        if known is not None and known[0] is dtype:
            ref = known[1]
        else:
            held = table.held
            # a held storage met again is registered by table.ref below: a record of its own
            if (known is None and held is not None and cdata not in held and cpu
                    and not tensor.requires_grad):
                nbytes = storage.nbytes()
                if (0 < nbytes < PACK_BELOW and tensor.storage_offset() == 0
                        and tensor.nbytes == nbytes and tensor.is_contiguous()):
                    if self._declared[REBUILD_V2]:
                        parts.append(_GETS[REBUILD_V2])
                    else:
                        self.named(REBUILD_V2)
                    held[cdata] = (len(parts), tensor, storage, nbytes, dtype)
                    parts.append(b"")  # its reference, once the state is done
                    return
            ref = table.ref(storage, dtype, storage_type,
                            storage.nbytes() // _ELEMENT_SIZES[dtype])
        if self._declared[REBUILD_V2]:
            parts.append(_GETS[REBUILD_V2])
        else:
            self.named(REBUILD_V2)
        parts.append(ref.marked)
        parts.append(tensor_tail(tensor.storage_offset(), tensor.shape, tensor.stride(),
                                 tensor.requires_grad))

    def _unusual(self, tensor: torch.Tensor, dtype: torch.dtype) -> None:
        """A tensor of a complex, quantized or untyped-storage dtype: never packed."""
        if tensor.is_quantized or tensor.is_conj() or not (tensor.is_cpu or tensor.is_cuda):
            self.other(tensor)
            return
        self.pieces(tensor_pieces(self.table.tensor_ref(tensor), dtype, tensor.storage_offset(),
                                  tensor.shape, tensor.stride(), tensor.requires_grad))

    def finish_packs(self) -> None:
        """Pack the storages still held, one record per dtype (:class:`~.records.Pack`, in
        the order their tensors were met), fill in their tensors' references, and add the list
        of tensors over the packs to the top-level dict (just emitted, so still on the stack)
        under :data:`~.packing.PACKS_KEY`."""
        held = self.table.held
        if not held:
            return
        table, parts = self.table, self.parts
        claim = table.claim
        packs: dict[torch.dtype, tuple[Pack, list[tuple[int, torch.Tensor, int]]]] = {}
        for index, tensor, storage, nbytes, dtype in held.values():
            claim(storage.data_ptr(), dtype)
            found = packs.get(dtype)
            if found is None:
                found = packs[dtype] = (Pack(), [])
            pack = found[0]
            found[1].append((index, tensor, pack.nbytes))
            pack.storages.append(storage)
            pack.nbytes += nbytes
        held.clear()
        spanning = []
        for dtype, (pack, members) in packs.items():
            size = _ELEMENT_SIZES[dtype]
            key = str(len(table.records))
            table.records.append(StorageRecord(key, pack))
            marked = storage_ref(_PLAIN_TYPES[dtype], key, "cpu", pack.nbytes // size).marked
            for index, tensor, offset in members:
                parts[index] = marked + tensor_tail(offset // size, tensor.shape,
                                                    tensor.stride(), False)
            spanning.append(marked + tensor_tail(0, (pack.nbytes // size,), (1,), False))
        parts.append(MARK)
        self.string(PACKS_KEY)
        parts.append(EMPTY_LIST)
        parts.append(MARK)
        for pickled in spanning:
            self.named(REBUILD_V2)
            parts.append(pickled)
        parts.append(_APPENDS)
        parts.append(SETITEMS)

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
        emit, append, small, short = self.emit, parts.append, SMALL_INTS, _U16.pack
        for start in range(0, len(value), _BATCH):
            append(MARK)
            for item in value[start:start + _BATCH]:
                # inlined for lists of small integers (an optimizer's parameter ids)
                if type(item) is int and 0 <= item < 65536:
                    append(small[item] if item < 256 else BININT2 + short(item))
                else:
                    emit(item)
            append(_APPENDS)

    def tuple_of(self, value: tuple[Any, ...]) -> None:
        if len(value) > 3:
            self.parts.append(MARK)
        for item in value:
            self.emit(item)
        self.parts.append(TUPLE_ENDS[len(value)] if len(value) < 4 else TUPLE)

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
    obj: Any, staged: Sequence[StorageRecord] = (), *, pack: bool = False
) -> tuple[bytes, list[StorageRecord]]:
    """``data.pkl`` of ``obj`` and the storages it references.

    ``staged`` are the records of a snapshot's :class:`StagedTensor` placeholders (keys
    ``"0"`` … ``str(len(staged) - 1)``); storages of live tensors get the keys after them.
    With ``pack``, small storages viewed by one tensor each are written as packs
    (:mod:`.packing`), listed in ``obj`` under :data:`~.packing.PACKS_KEY`: ``obj`` must then
    be a dict without that key.
    """
    if pack and (type(obj) is not dict or PACKS_KEY in obj):
        raise ValueError(f"packing needs a dict without the key {PACKS_KEY!r} to list the "
                         f"packs in, not a {type(obj).__qualname__}")
    table = _StorageTable(staged, [], pack)
    emitter = _Emitter(table)
    emitter.parts.append(b"\x80" + bytes([PICKLE_PROTOCOL]))
    emitter.emit(obj)
    emitter.finish_packs()
    emitter.parts.append(STOP)
    return b"".join(emitter.parts), table.records
