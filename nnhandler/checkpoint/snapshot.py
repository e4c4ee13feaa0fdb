"""Snapshots of a checkpoint's state into reusable host memory, for writing in the background.

:meth:`StagingBuffers.take` deep-copies the containers of a state (dicts, ``OrderedDict`` with
its attributes such as a state dict's ``_metadata``, lists, tuples; numbers and strings are
immutable and shared) and copies the data of every tensor storage into one host *arena* (pinned
when a storage lives on CUDA): one ``torch.cat`` for all CPU storages (each at a 64-byte aligned
place, zero-filled gaps between them), asynchronous copies on the current stream for CUDA ones.
In the copy each tensor becomes a :class:`StagedTensor` that carries its pickled form, exactly
as the live tensor pickles (same storages and sharing, offsets, sizes, strides, dtype,
``requires_grad``, the live storage's location such as ``cuda:0``), so a file written from a
snapshot holds the same content as a synchronous save of the same state.

The layout of a state (which storages, their sizes, every tensor's dtype, shape, stride and
offset) is the same from one save to the next in a training run, so the arena, the copy sources
and the placeholders are computed once (a *plan*) and reused for as long as the layout holds;
the arena is reallocated only when a state needs more room than it has. The plan keeps the live
storages it copies from (as flat byte views), so a storage met again is recognised by identity
and the copy list is reused as it is; a storage that is new but takes the place of a planned one
of the same size with no other user (a freshly built RNG state, say) is swapped into the plan.
Anything else that differs makes a new plan. The storages a plan holds are released by the next
plan or by :meth:`StagingBuffers.release`. Tensors that are not plain strided CPU/CUDA tensors
(quantized, sparse, nested, conjugate views, subclasses other than ``nn.Parameter``) are
deep-copied on their own instead.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import torch
from torch import nn
from torch.serialization import location_tag

from .envelope import PLAIN_LEAF_TYPES
from .pickling import (
    StagedTensor,
    StorageRecord,
    mixed_dtypes_error,
    parameter_pieces,
    storage_ref,
    storage_type_of,
    tensor_pieces,
)
from .zipwriter import host_view

__all__ = ["Snapshot", "StagedTensor", "StagingBuffers"]

_STRIDED: Final = torch.strided
#: storages start at multiples of this in the arena (cache lines; what the zip writer needs to
#: line a record up with file blocks)
_ARENA_ALIGNMENT: Final = 64
#: the gaps between CPU storages in the arena are copied from here
_ZEROS: Final = torch.zeros(_ARENA_ALIGNMENT, dtype=torch.uint8)


class _Signature(NamedTuple):
    """What a plan expects of the tensor at one position of the walk."""

    storage_index: int
    dtype: torch.dtype
    shape: torch.Size
    stride: tuple[int, ...]
    offset: int
    requires_grad: bool
    is_parameter: bool
    storage_bytes: int
    device: torch.device


@dataclass(frozen=True)
class Snapshot:
    """A state copied into host memory: ``value`` holds :class:`StagedTensor` placeholders whose
    data are ``records`` (views of the arena). Call :meth:`wait` before reading the data: device
    copies may still be in flight."""

    value: Any
    records: tuple[StorageRecord, ...]
    nbytes: int
    #: the host memory ``records`` view (the views alone do not keep it alive)
    arena: torch.Tensor
    events: tuple[Any, ...] = ()

    def wait(self) -> None:
        for event in self.events:
            event.synchronize()


@dataclass
class _Plan:
    signatures: list[_Signature]
    placeholders: list[StagedTensor]
    arena: torch.Tensor
    records: tuple[StorageRecord, ...]
    nbytes: int
    #: per storage: the live storage (kept, so that its ``_cdata`` stays its own) and a flat
    #: byte view of it (the copy source)
    storages: list[torch.UntypedStorage]
    sources: list[torch.Tensor]
    #: per tensor position: the ``_cdata`` of the storage planned for it
    cdatas: list[int]
    #: per storage: the number of tensor positions that use it
    users: list[int]
    #: ``_cdata`` of every planned storage
    known: set[int]
    #: the CPU storages' sources in arena order, with zero gaps between them, and the front of
    #: the arena they fill (one ``torch.cat``); the place of each CPU storage index in that list
    host_sources: list[torch.Tensor]
    host_region: torch.Tensor | None
    host_position: dict[int, int]
    #: storages on other devices: (storage index, destination in the arena)
    device_copies: list[tuple[int, torch.Tensor]]


class _Walk:
    """One pass over a state that copies its containers.

    With a plan, each tensor is checked against the plan as it is met and replaced by the plan's
    placeholder (``failed`` is set at the first difference; ``swaps`` lists planned storages to
    replace by new ones of the same layout). Without a plan (``plan=None``) it records each
    tensor's signature and storage: the material for a new plan.
    """

    __slots__ = ("failed", "plan", "position", "signatures", "sources", "storage_index",
                 "swaps")

    def __init__(self, plan: _Plan | None) -> None:
        self.plan = plan
        self.failed = False
        self.position = 0
        self.signatures: list[_Signature] = []
        #: (recording) per storage index: a tensor using it and the storage
        self.sources: list[tuple[torch.Tensor, torch.UntypedStorage]] = []
        self.storage_index: dict[int, int] = {}
        #: (checking) storage index -> the new storage that takes the planned one's place
        self.swaps: dict[int, torch.UntypedStorage] = {}

    @property
    def matched(self) -> bool:
        """Every tensor matched the plan (each was compared as it was met)."""
        plan = self.plan
        return plan is not None and not self.failed and len(plan.signatures) == self.position

    def copy(self, value: Any) -> Any:
        kind = type(value)
        if kind in PLAIN_LEAF_TYPES:
            return value
        if kind is dict or kind is OrderedDict:  # the bulk of every state: (ordered) dicts
            copied = kind()
            tensor, leaves = self.tensor, PLAIN_LEAF_TYPES
            for key, item in value.items():
                item_kind = type(item)
                if item_kind is torch.Tensor:
                    copied[key] = tensor(item)
                elif item_kind in leaves:
                    copied[key] = item
                else:
                    copied[key] = self.copy(item)
            if kind is OrderedDict:
                attributes = vars(value)
                if attributes:  # a state dict's _metadata
                    vars(copied).update(self.copy(dict(attributes)))
            return copied
        if kind is list:
            return [self.copy(item) for item in value]
        if kind is tuple:
            return tuple(self.copy(item) for item in value)
        return self.tensor(value)  # ensure_plain let nothing else through

    def tensor(self, value: torch.Tensor) -> Any:
        kind = type(value)
        if kind is torch.Tensor:
            data, is_parameter = value, False
        elif kind is nn.Parameter and not value.__dict__:
            data, is_parameter = value.data, True
        else:
            return _deep_copy(value)
        # is_fast_tensor(data), inlined: this runs for every tensor of every save
        if (data.layout is not _STRIDED or data.is_quantized or data.is_nested
                or not (data.is_cpu or data.is_cuda) or data.is_conj() or data.is_neg()
                or data.__dict__):
            return _deep_copy(value)
        storage = data.untyped_storage()
        position = self.position
        self.position = position + 1
        plan = self.plan
        if plan is None:
            return self._record(value, data, storage, is_parameter)
        if not self.failed and position < len(plan.signatures):
            expected = plan.signatures[position]
            if (expected[1] is data.dtype and expected[2] == data.shape
                    and expected[3] == data.stride() and expected[4] == data.storage_offset()
                    and expected[5] is value.requires_grad and expected[6] is is_parameter
                    and expected[7] == storage.nbytes()
                    and (storage._cdata == plan.cdatas[position] or self._swap(expected, storage))):
                return plan.placeholders[position]
        self.failed = True  # the layout changed: the state is walked again for a new plan
        return None

    def _swap(self, expected: _Signature, storage: torch.UntypedStorage) -> bool:
        """Whether ``storage``, not the planned one, may take the place of storage
        ``expected.storage_index``: it has the planned size and device, and neither is shared
        with another tensor."""
        plan = self.plan
        assert plan is not None
        index = expected.storage_index
        cdata = storage._cdata
        if (plan.users[index] != 1 or cdata in plan.known or storage.device != expected.device
                or any(other._cdata == cdata for other in self.swaps.values())):
            return False
        self.swaps[index] = storage
        return True

    def _record(self, value: torch.Tensor, data: torch.Tensor, storage: torch.UntypedStorage,
                is_parameter: bool) -> None:
        sources = self.sources
        index = self.storage_index.setdefault(storage._cdata, len(sources))
        if index == len(sources):
            sources.append((data, storage))
        self.signatures.append(_Signature(
            index, data.dtype, data.shape, data.stride(), int(data.storage_offset()),
            value.requires_grad, is_parameter, storage.nbytes(), data.device))


def _deep_copy(value: torch.Tensor) -> torch.Tensor:
    """A copy of a tensor the staging path does not take, with its conjugate/negative bit."""
    if value.is_conj():  # clone() and deepcopy() resolve the bit: copy the plain view instead
        return _deep_copy(value.detach().conj()).conj()
    if value.is_neg():
        return torch._neg_view(_deep_copy(torch._neg_view(value.detach())))
    if value.is_leaf:
        return copy.deepcopy(value)
    return value.detach().clone()


class StagingBuffers:
    """Host memory for snapshots, allocated once and reused while the state keeps its layout.

    Not thread-safe: the caller makes sure that the previous snapshot has been written before
    taking the next (the arena is overwritten).
    """

    __slots__ = ("_plan",)

    def __init__(self) -> None:
        self._plan: _Plan | None = None

    @property
    def arena(self) -> torch.Tensor | None:
        """The host buffer the last snapshot was copied into (``None`` before the first)."""
        return self._plan.arena if self._plan is not None else None

    def release(self) -> None:
        """Drop the arena and the storages the plan holds (the next snapshot plans anew)."""
        self._plan = None

    def take(self, value: Any) -> Snapshot:
        """Copy ``value`` (checked plain data: see ``ensure_plain``) into host memory.

        Blocks only for the copies of CPU storages; device-to-host copies are queued on the
        current stream and :meth:`Snapshot.wait` waits for them.
        """
        walk = _Walk(self._plan) if self._plan is not None else None
        copied = walk.copy(value) if walk is not None else None
        if walk is None or not walk.matched:  # first save, or the layout changed
            recorded = _Walk(None)
            recorded.copy(value)
            layout = _Layout([storage for _, storage in recorded.sources])
            arena = self._plan.arena if self._plan is not None else None
            self._plan = walk = None  # the old plan's storages go before the new plan comes
            if arena is not None and not layout.fits(arena):
                arena = None  # freed before a larger one is allocated
            self._plan = _make_plan(recorded, layout, arena)
            del arena
            walk = _Walk(self._plan)
            copied = walk.copy(value)
            if not walk.matched:  # cannot happen: the state was not changed in between
                raise RuntimeError("the state changed while it was being snapshotted")
        plan = self._plan
        assert plan is not None
        for index, storage in walk.swaps.items():
            _swap_storage(plan, index, storage)
        events = _copy_storages(plan)
        return Snapshot(copied, plan.records, plan.nbytes, plan.arena, events)


def _alias(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat ``uint8`` tensor over all of ``storage``'s bytes."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class _Layout:
    """Where each storage goes in the arena: CPU storages first, each at a multiple of
    ``_ARENA_ALIGNMENT`` (the zip writer lines large ones up with file blocks), copied by one
    ``torch.cat`` with zero-filled gaps between them; device storages after them (pinned
    memory)."""

    def __init__(self, storages: list[torch.UntypedStorage]) -> None:
        self.on_host = [storage.device.type == "cpu" for storage in storages]
        self.offsets = [0] * len(storages)
        #: per CPU storage: the gap (bytes) before it in the arena
        self.gaps: dict[int, int] = {}
        total = 0
        for index, storage in enumerate(storages):
            if self.on_host[index]:
                aligned = math.ceil(total / _ARENA_ALIGNMENT) * _ARENA_ALIGNMENT
                self.gaps[index] = aligned - total
                self.offsets[index] = aligned
                total = aligned + storage.nbytes()
        self.host_total = total
        for index, storage in enumerate(storages):
            if not self.on_host[index]:
                total = math.ceil(total / _ARENA_ALIGNMENT) * _ARENA_ALIGNMENT
                self.offsets[index] = total
                total += storage.nbytes()
        self.total = total
        self.pin = not all(self.on_host)

    def fits(self, arena: torch.Tensor) -> bool:
        return arena.numel() >= self.total and (arena.is_pinned() or not self.pin)


def _make_plan(walk: _Walk, layout: _Layout, arena: torch.Tensor | None) -> _Plan:
    """The copy sources and the placeholders for the storages ``walk`` recorded, in ``arena``
    (allocated here when ``None``)."""
    sources = walk.sources
    signatures = walk.signatures
    storages = [storage for _, storage in sources]
    per_storage: list[list[_Signature]] = [[] for _ in sources]
    for signature in signatures:
        per_storage[signature.storage_index].append(signature)
    on_host, offsets, total = layout.on_host, layout.offsets, layout.total
    if arena is None:
        arena = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=layout.pin)
    arena_bytes, _ = host_view(arena.untyped_storage())
    records, refs, aliases = [], [], []
    device_copies = []
    for index, (storage, offset) in enumerate(zip(storages, offsets, strict=True)):
        size = storage.nbytes()
        key = str(index)
        records.append(StorageRecord(key, arena_bytes[offset:offset + size]))
        pickled_dtypes = {_pickled_dtype(signature.dtype) for signature in per_storage[index]}
        if len(pickled_dtypes) > 1:
            raise mixed_dtypes_error(*sorted(pickled_dtypes, key=str)[:2])
        (dtype,) = pickled_dtypes
        element = torch.empty((), dtype=dtype).element_size()
        refs.append(storage_ref(storage_type_of(dtype), key, location_tag(storage),
                                size // element))
        aliases.append(_alias(storage))
        if not on_host[index] and size:
            device_copies.append((index, arena[offset:offset + size]))
    placeholders = [_placeholder(signature, refs[signature.storage_index])
                    for signature in signatures]
    host_sources, host_position = [], {}
    for index, gap in layout.gaps.items():
        if gap:
            host_sources.append(_ZEROS[:gap])
        host_position[index] = len(host_sources)
        host_sources.append(aliases[index])
    return _Plan(
        signatures, placeholders, arena, tuple(records), total, storages, aliases,
        cdatas=[storages[signature.storage_index]._cdata for signature in signatures],
        users=[len(users) for users in per_storage],
        known={storage._cdata for storage in storages},
        host_sources=host_sources,
        host_region=arena[:layout.host_total] if layout.host_total else None,
        host_position=host_position,
        device_copies=device_copies,
    )


def _swap_storage(plan: _Plan, index: int, storage: torch.UntypedStorage) -> None:
    """Put ``storage`` in the place of planned storage ``index`` (same size and device, one
    user): the copy reads from it from now on."""
    old = plan.storages[index]
    plan.known.discard(old._cdata)
    plan.known.add(storage._cdata)
    plan.cdatas = [storage._cdata if cdata == old._cdata else cdata for cdata in plan.cdatas]
    plan.storages[index] = storage
    plan.sources[index] = _alias(storage)
    position = plan.host_position.get(index)
    if position is not None:
        plan.host_sources[position] = plan.sources[index]


def _pickled_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a storage is recorded with (``torch.uint8`` for untyped storages)."""
    return torch.uint8 if storage_type_of(dtype) is torch.UntypedStorage else dtype


def _placeholder(signature: _Signature, ref: Any) -> StagedTensor:
    grad = signature.requires_grad and not signature.is_parameter
    pieces = tensor_pieces(ref, signature.dtype, signature.offset, signature.shape,
                           signature.stride, grad)
    if signature.is_parameter:  # as nn.Parameter.__reduce_ex__ writes it
        pieces = parameter_pieces(pieces, signature.requires_grad)
    return StagedTensor(pieces)


def _copy_storages(plan: _Plan) -> tuple[Any, ...]:
    """Copy every storage into the arena: one ``torch.cat`` for the CPU storages (torch loops
    over them in C++, where a copy per storage would cost a dispatch each); CUDA copies are
    asynchronous (pinned destinations) and an event per device marks their end."""
    if plan.host_region is not None:
        torch.cat(plan.host_sources, out=plan.host_region)
    by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for index, destination in plan.device_copies:
        by_device.setdefault(plan.storages[index].device, []).append((index, destination))
    events = []
    for device, copies in by_device.items():  # device-to-host: asynchronous, in stream order
        with torch.cuda.device(device):
            for index, destination in copies:
                destination.copy_(plan.sources[index], non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
            events.append(event)
    return tuple(events)
