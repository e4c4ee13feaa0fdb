"""Reading a checkpoint's envelope without torch, for checks that never need a tensor's values.

``nnhandler verify`` and ``list`` (through :func:`~.discovery.check_candidate`) ask whether a
file *would load*: its checksums, its format version and its content against the declared
schema. Tensors are only mapped for that, never read, so torch is not needed either: this
module unpickles ``data.pkl`` with a restricted unpickler of its own that puts a
:class:`TensorRef` (dtype, shape, stride, offset, storage) where a tensor would be, and checks
each tensor against its storage record the way ``torch.load`` would.

It reads a strict subset of what ``torch.load(weights_only=True)`` reads: the opcodes both
nnhandler's writers and ``torch.save`` emit for dicts, ``OrderedDict`` state dicts (with their
``_metadata``), lists, tuples, strings, numbers, bytes and tensors of the classic dtypes in
storages of the zip. Anything else — another global (``torch.Size``, ``torch.dtype``,
``torch.device``, parameters with state, ``_rebuild_tensor_v3`` dtypes), another opcode or
protocol, a storage record that is missing or too small, an unusual archive — raises
:class:`NeedsTorch`, and the caller reads the file with ``torch.load`` instead
(:func:`~.envelope.read_checkpoint`), which gives the verdict. So this reader never accepts a
file that ``torch.load`` refuses, and never refuses a file by itself.
"""

from __future__ import annotations

import io
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

__all__ = ["NeedsTorch", "TensorRef", "read_plain_envelope", "tensor_facts"]


class NeedsTorch(Exception):
    """The file uses something this reader does not decode; read it with ``torch.load``."""


@dataclass(frozen=True, eq=False)  # identity, as tensors: two equal refs are two tensors
class TensorRef:
    """Where a tensor would be: its dtype (``"float32"``), shape, stride, storage offset (in
    elements), the storage record's key and ``requires_grad``."""

    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    storage: str
    requires_grad: bool = False
    parameter: bool = False

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


def tensor_facts(value: Any) -> tuple[str, tuple[int, ...]] | None:
    """``(dtype name, shape)`` of a tensor or a :class:`TensorRef`, ``None`` for anything else.
    Never imports torch: a ``torch.Tensor`` exists only where torch is imported already."""
    if isinstance(value, TensorRef):
        return value.dtype, value.shape
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return str(value.dtype).removeprefix("torch."), tuple(value.shape)
    return None


#: the legacy typed storages ``_rebuild_tensor_v2`` rebuilds from: dtype name and item size
_STORAGES: Final = {
    "FloatStorage": ("float32", 4), "DoubleStorage": ("float64", 8),
    "HalfStorage": ("float16", 2), "BFloat16Storage": ("bfloat16", 2),
    "LongStorage": ("int64", 8), "IntStorage": ("int32", 4), "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1), "ByteStorage": ("uint8", 1), "BoolStorage": ("bool", 1),
    "ComplexFloatStorage": ("complex64", 8), "ComplexDoubleStorage": ("complex128", 16),
}


@dataclass(frozen=True)
class _Global:
    name: str


_ORDERED_DICT: Final = _Global("collections.OrderedDict")
_REBUILD_TENSOR: Final = _Global("torch._utils._rebuild_tensor_v2")
_REBUILD_PARAMETER: Final = _Global("torch._utils._rebuild_parameter")
_ENCODE: Final = _Global("_codecs.encode")
_GLOBALS: Final = {g.name: g for g in (_ORDERED_DICT, _REBUILD_TENSOR, _REBUILD_PARAMETER,
                                       _ENCODE)}


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    itemsize: int
    numel: int


def read_plain_envelope(path: Path) -> Any:
    """The object ``torch.load(path, weights_only=True, mmap=True)`` would return, with a
    :class:`TensorRef` for each tensor; raises :class:`NeedsTorch` where it cannot be sure
    (module docstring). Call it after :func:`~.ziplayout.check_zip_layout`."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            if not infos:
                raise NeedsTorch("an empty archive")
            prefix = infos[0].filename.split("/", 1)[0]
            sizes = {info.filename: info.file_size for info in infos}
            if f"{prefix}/data.pkl" not in sizes or f"{prefix}/constants.pkl" in sizes:
                raise NeedsTorch("no data.pkl record, or a TorchScript archive")
            byteorder = (archive.read(f"{prefix}/byteorder")
                         if f"{prefix}/byteorder" in sizes else b"little")
            if byteorder != sys.byteorder.encode():
                raise NeedsTorch(f"byte order {byteorder!r:.20}")
            data = archive.read(f"{prefix}/data.pkl")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise NeedsTorch(f"the archive: {error}") from error
    unpickler = _Unpickler(data, {name.removeprefix(f"{prefix}/data/"): size
                                  for name, size in sizes.items()
                                  if name.startswith(f"{prefix}/data/")})
    try:
        return unpickler.load()
    except NeedsTorch:
        raise
    except Exception as error:  # a malformed stream: torch.load says what is wrong with it
        raise NeedsTorch(f"the pickle: {type(error).__name__}: {error}") from error


_U32: Final = struct.Struct("<I")
_I32: Final = struct.Struct("<i")
_U16: Final = struct.Struct("<H")
_F64: Final = struct.Struct(">d")


class _Unpickler:
    """The loop of ``torch._weights_only_unpickler.Unpickler``, cut to the subset above."""

    def __init__(self, data: bytes, records: dict[str, int]) -> None:
        self._file = io.BytesIO(data)
        self._records = records  # storage key -> record size in bytes
        self._storages: dict[str, _Storage] = {}
        self._memo: dict[int, Any] = {}
        self._stack: list[Any] = []
        self._metastack: list[list[Any]] = []

    def load(self) -> Any:
        read, readline = self._file.read, self._file.readline
        while True:
            key = read(1)
            if not key:
                raise NeedsTorch("the pickle ends before STOP")
            op = key[0]
            stack = self._stack
            if op == pickle.PROTO[0]:
                if read(1) != b"\x02":
                    raise NeedsTorch("a pickle protocol other than 2")
            elif op == pickle.STOP[0]:
                return stack.pop()
            elif op == pickle.GLOBAL[0]:
                module = readline()[:-1].decode("utf-8")
                name = readline()[:-1].decode("utf-8")
                stack.append(self._global(f"{module}.{name}"))
            elif op == pickle.REDUCE[0]:
                args = stack.pop()
                stack[-1] = self._reduce(stack[-1], args)
            elif op == pickle.BUILD[0]:
                state = stack.pop()
                inst = stack[-1]
                if type(inst) is not OrderedDict or type(state) is not dict:
                    raise NeedsTorch(f"BUILD of a {type(inst).__name__}")
                inst.__dict__.update(state)
            elif op == pickle.BINPERSID[0]:
                stack.append(self._storage(stack.pop()))
            elif op == pickle.EMPTY_DICT[0]:
                stack.append({})
            elif op == pickle.EMPTY_LIST[0]:
                stack.append([])
            elif op == pickle.EMPTY_TUPLE[0]:
                stack.append(())
            elif op == pickle.MARK[0]:
                self._metastack.append(stack)
                self._stack = []
            elif op == pickle.SETITEM[0]:
                value, item_key = stack.pop(), stack.pop()
                self._check_mapping(stack[-1])[item_key] = value
            elif op == pickle.SETITEMS[0]:
                items = self._pop_mark()
                target = self._check_mapping(self._stack[-1])
                for index in range(0, len(items), 2):
                    target[items[index]] = items[index + 1]
            elif op == pickle.APPEND[0]:
                item = stack.pop()
                self._check_list(stack[-1]).append(item)
            elif op == pickle.APPENDS[0]:
                items = self._pop_mark()
                self._check_list(self._stack[-1]).extend(items)
            elif op == pickle.TUPLE[0]:
                items = self._pop_mark()
                self._stack.append(tuple(items))
            elif op == pickle.TUPLE1[0]:
                stack[-1] = (stack[-1],)
            elif op == pickle.TUPLE2[0]:
                stack[-2:] = [(stack[-2], stack[-1])]
            elif op == pickle.TUPLE3[0]:
                stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
            elif op == pickle.NONE[0]:
                stack.append(None)
            elif op == pickle.NEWTRUE[0]:
                stack.append(True)
            elif op == pickle.NEWFALSE[0]:
                stack.append(False)
            elif op == pickle.BININT[0]:
                stack.append(_I32.unpack(read(4))[0])
            elif op == pickle.BININT1[0]:
                stack.append(read(1)[0])
            elif op == pickle.BININT2[0]:
                stack.append(_U16.unpack(read(2))[0])
            elif op == pickle.LONG1[0]:
                stack.append(pickle.decode_long(read(read(1)[0])))
            elif op == pickle.BINFLOAT[0]:
                stack.append(_F64.unpack(read(8))[0])
            elif op == pickle.BINUNICODE[0]:
                length = _U32.unpack(read(4))[0]
                text = read(length)
                if len(text) != length:
                    raise NeedsTorch("a truncated string")
                stack.append(str(text, "utf-8", "surrogatepass"))
            elif op in (pickle.BINGET[0], pickle.LONG_BINGET[0]):
                index = read(1)[0] if op == pickle.BINGET[0] else _U32.unpack(read(4))[0]
                stack.append(self._memo[index])
            elif op in (pickle.BINPUT[0], pickle.LONG_BINPUT[0]):
                index = read(1)[0] if op == pickle.BINPUT[0] else _U32.unpack(read(4))[0]
                self._memo[index] = stack[-1]
            else:
                raise NeedsTorch(f"pickle opcode {key!r}")

    def _pop_mark(self) -> list[Any]:
        items = self._stack
        self._stack = self._metastack.pop()
        return items

    @staticmethod
    def _check_mapping(target: Any) -> dict[Any, Any]:
        if type(target) not in (dict, OrderedDict):
            raise NeedsTorch(f"SETITEM on a {type(target).__name__}")
        return target  # type: ignore[no-any-return]

    @staticmethod
    def _check_list(target: Any) -> list[Any]:
        if type(target) is not list:
            raise NeedsTorch(f"APPEND to a {type(target).__name__}")
        return target

    @staticmethod
    def _global(name: str) -> Any:
        found = _GLOBALS.get(name)
        if found is not None:
            return found
        module, _, storage = name.rpartition(".")
        if module == "torch" and storage in _STORAGES:
            return _Global(name)
        raise NeedsTorch(f"the global {name}")

    def _storage(self, pid: Any) -> _Storage:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise NeedsTorch(f"a persistent id {pid!r:.80}")
        _, kind, key, location, numel = pid
        if not (isinstance(kind, _Global) and kind.name.startswith("torch.")
                and kind.name.removeprefix("torch.") in _STORAGES and type(key) is str
                and type(location) is str and type(numel) is int and numel >= 0):
            raise NeedsTorch(f"a persistent id {pid!r:.80}")
        dtype, itemsize = _STORAGES[kind.name.removeprefix("torch.")]
        storage = _Storage(key, dtype, itemsize, numel)
        size = self._records.get(key)
        if size is None or size < numel * itemsize:
            raise NeedsTorch(f"storage record {key!r}: missing or smaller than it is declared")
        seen = self._storages.setdefault(key, storage)
        if seen != storage:
            raise NeedsTorch(f"storage record {key!r} declared twice, differently")
        return storage

    def _reduce(self, function: Any, args: Any) -> Any:
        if type(args) is not tuple:
            raise NeedsTorch("REDUCE without an argument tuple")
        if function is _ORDERED_DICT and (not args or (len(args) == 1
                                                       and type(args[0]) is list)):
            return OrderedDict(*args)
        if function is _ENCODE and len(args) == 2 and type(args[0]) is str \
                and args[1] == "latin1":
            return args[0].encode("latin1")
        if function is _REBUILD_TENSOR:
            return self._tensor(args)
        if function is _REBUILD_PARAMETER and len(args) == 3 \
                and isinstance(args[0], TensorRef) and type(args[1]) is bool \
                and (args[2] is None or (type(args[2]) is OrderedDict and not args[2])):
            return replace(args[0], requires_grad=args[1], parameter=True)
        raise NeedsTorch(f"a call of {getattr(function, 'name', type(function).__name__)}")

    @staticmethod
    def _tensor(args: tuple[Any, ...]) -> TensorRef:
        if len(args) == 7 and args[6] is None:
            args = args[:6]  # no metadata
        if len(args) != 6:
            raise NeedsTorch("_rebuild_tensor_v2 with tensor metadata")
        storage, offset, shape, stride, requires_grad, hooks = args
        if not (isinstance(storage, _Storage) and type(offset) is int and offset >= 0
                and _ints(shape) and _ints(stride) and len(shape) == len(stride)
                and type(requires_grad) is bool
                and (hooks is None or (type(hooks) is OrderedDict and not hooks))):
            raise NeedsTorch("_rebuild_tensor_v2 with unusual arguments")
        if all(shape):  # an empty tensor needs no storage; else its last element must fit
            last = offset + sum((size - 1) * step for size, step in zip(shape, stride, strict=True))
            if last >= storage.numel:
                raise NeedsTorch("a tensor beyond its storage")
        return TensorRef(storage.dtype, shape, stride, offset, storage.key, requires_grad)


def _ints(values: Any) -> bool:
    return type(values) is tuple and all(type(value) is int and value >= 0 for value in values)
