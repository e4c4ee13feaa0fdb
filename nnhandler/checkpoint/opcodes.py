"""Opcode bytes of protocol-2 pickles, for the fast writer's emitter (:mod:`.pickling`).

Plain values (integers, strings, tuples of integers, globals) and the two pieces every tensor
is pickled with: its storage's persistent id (:class:`StorageRef`, interned per process by
:func:`storage_ref`) and the arguments that follow it (:func:`tensor_tail`: offset, shape,
stride, ``requires_grad``, no hooks, ``TUPLE``, ``REDUCE``), cached per process because a
training run saves the same layouts again and again. No torch private is touched here.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Sequence
from pickle import (
    BININT,
    BININT1,
    BININT2,
    BINPERSID,
    BINUNICODE,
    EMPTY_TUPLE,
    GLOBAL,
    LONG1,
    MARK,
    NEWFALSE,
    NEWTRUE,
    NONE,
    REDUCE,
    TUPLE,
    TUPLE1,
    TUPLE2,
    TUPLE3,
)
from typing import Any, Final

import torch

__all__ = ["SMALL_INTS", "TUPLE_ENDS", "StorageRef", "encode_global", "encode_int",
           "encode_int_tuple", "encode_str", "storage_ref", "tensor_tail"]

_U32: Final = struct.Struct("<I")
_I32: Final = struct.Struct("<i")
_U16: Final = struct.Struct("<H")
SMALL_INTS: Final = tuple(BININT1 + bytes([value]) for value in range(256))
#: tuples of up to three items close with one opcode, longer ones with MARK ... TUPLE
TUPLE_ENDS: Final = (EMPTY_TUPLE, TUPLE1, TUPLE2, TUPLE3)


def encode_global(obj: Any) -> bytes:
    """The GLOBAL opcode that names ``obj`` (a class or function) as pickle does."""
    return GLOBAL + f"{obj.__module__}\n{obj.__qualname__}\n".encode()


def encode_int(value: int) -> bytes:
    """``value`` as the shortest of BININT1, BININT2, BININT and LONG1 (an
    :class:`OverflowError` for integers longer than LONG1 holds)."""
    if 0 <= value < 256:
        return SMALL_INTS[value]
    if 0 <= value < 65536:
        return BININT2 + _U16.pack(value)
    if -0x80000000 <= value < 0x80000000:
        return BININT + _I32.pack(value)
    encoded = pickle.encode_long(value)
    if len(encoded) >= 256:
        raise OverflowError("an integer this long is pickled by the C pickler")
    return LONG1 + bytes([len(encoded)]) + encoded


def encode_str(value: str) -> bytes:
    encoded = value.encode("utf-8", "surrogatepass")
    return BINUNICODE + _U32.pack(len(encoded)) + encoded


def encode_int_tuple(values: Sequence[int]) -> bytes:
    items = b"".join(encode_int(value) for value in values)
    if len(values) < 4:
        return items + TUPLE_ENDS[len(values)]
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
            named = _STORAGE_GLOBALS[storage_type] = _PID_HEAD + encode_global(storage_type)
        self.marked = b"".join((MARK, named, encode_str(key), encode_str(location),
                                encode_int(numel), TUPLE, BINPERSID))


_PID_HEAD: Final = MARK + encode_str("storage")
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


#: (offset, shape, stride, requires_grad) -> the bytes after a tensor's persistent id; shared by
#: every save in the process, and cleared when it grows large. Packed tensors (:mod:`.packing`)
#: each have their own offset, so a state of many small tensors has as many tails as tensors.
_TAILS: dict[tuple[Any, Any, Any, bool], bytes] = {}
_TAILS_LIMIT: Final = 1 << 15


def tensor_tail(offset: int | torch.SymInt, shape: Sequence[int], stride: Sequence[int],
                requires_grad: bool) -> bytes:
    """The bytes after a tensor's persistent id: its offset, shape, stride,
    ``requires_grad``, ``None`` for hooks, ``TUPLE`` and ``REDUCE``."""
    key = (offset, shape, stride, requires_grad)
    tail = _TAILS.get(key)
    if tail is None:
        tail = b"".join((encode_int(int(offset)), encode_int_tuple(shape),
                         encode_int_tuple(stride), NEWTRUE if requires_grad else NEWFALSE, NONE,
                         TUPLE, REDUCE))
        if len(_TAILS) >= _TAILS_LIMIT:
            _TAILS.clear()
        _TAILS[key] = tail
    return tail
