"""Snapshots of a checkpoint's state into reusable host memory, for writing in the background.

:meth:`StagingBuffers.take` deep-copies the containers of a state (dicts, lists, tuples; numbers
and strings are immutable and shared) and copies the data of every tensor storage into one host
*arena* (pinned when a storage lives on CUDA): one batched ``torch._foreach_copy_`` for CPU
storages, asynchronous copies on the current stream for CUDA ones. In the copy each tensor
becomes a :class:`StagedTensor`, which pickles exactly as the live tensor would (same storages
and sharing, offsets, sizes, strides, dtype, ``requires_grad``, the live storage's location such
as ``cuda:0``), so a file written from a snapshot holds the same content as a synchronous save of
the same state.

The layout of a state (which storages, their sizes, every tensor's dtype, shape, stride and
offset) is the same from one save to the next in a training run, so the arena, the copy
destinations and the placeholders are computed once (a *plan*) and reused for as long as the
layout holds; the arena is reallocated only when a state needs more room than it has. Tensors
that are not plain strided CPU/CUDA tensors (quantized, sparse, nested, conjugate views,
subclasses other than ``nn.Parameter``) are deep-copied on their own instead.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import torch
from torch import nn
from torch._utils import _rebuild_parameter, _rebuild_tensor_v2, _rebuild_tensor_v3
from torch.serialization import location_tag

from .envelope import PLAIN_LEAF_TYPES
from .pickling import (
    StagedTensor,
    StorageRecord,
    StorageRef,
    mixed_dtypes_error,
    storage_type_of,
)
from .zipwriter import ALIGNMENT, host_view

__all__ = ["Snapshot", "StagedTensor", "StagingBuffers"]

_STRIDED: Final = torch.strided

#: (storage index, dtype, shape, stride, offset, requires_grad, is_parameter, storage bytes,
#: device): two saves with equal signatures for every tensor share a plan
_Signature = tuple[int, torch.dtype, torch.Size, tuple[int, ...], int, bool, bool, int,
                   torch.device]


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
    #: per storage (by index): the copy destination in the arena, or None for empty storages
    destinations: list[torch.Tensor | None]
    #: per storage: True where one tensor covers the whole storage contiguously (copied as is)
    whole: list[bool]
    records: tuple[StorageRecord, ...]
    nbytes: int
    devices: list[torch.device] = field(default_factory=list)


class _Walk:
    """One pass over a state: copies containers and, per tensor, either checks it against the
    plan (``plan`` given: the copy gets the plan's placeholders) or records its signature
    (``plan=None``: the material for a new plan)."""

    __slots__ = ("count", "plan", "recording", "signatures", "sources", "storage_index")

    def __init__(self, plan: _Plan | None) -> None:
        self.plan = plan
        self.recording = plan is None
        self.count = 0
        self.signatures: list[_Signature] = []
        #: per storage index: (first tensor using it, its storage)
        self.sources: list[tuple[torch.Tensor, torch.UntypedStorage]] = []
        self.storage_index: dict[int, int] = {}

    @property
    def matched(self) -> bool:
        """Every tensor matched the plan (each was compared as it was met)."""
        return self.plan is not None and len(self.plan.signatures) == self.count

    def copy(self, value: Any) -> Any:
        kind = type(value)
        if kind in PLAIN_LEAF_TYPES:
            return value
        if kind is dict:  # the bulk of every state: dicts of tensors, one call less per item
            copied = {}
            for key, item in value.items():
                item_kind = type(item)
                if item_kind is torch.Tensor:
                    copied[key] = self.tensor(item)
                elif item_kind in PLAIN_LEAF_TYPES:
                    copied[key] = item
                else:
                    copied[key] = self.copy(item)
            return copied
        if kind is list:
            return [self.copy(item) for item in value]
        if kind is tuple:
            return tuple(self.copy(item) for item in value)
        if kind is OrderedDict:
            return OrderedDict((key, self.copy(item)) for key, item in value.items())
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
        sources = self.sources
        index = self.storage_index.setdefault(storage._cdata, len(sources))
        if index == len(sources):
            sources.append((data, storage))
        position = self.count
        self.count += 1
        if self.recording:
            self.signatures.append((index, data.dtype, data.shape, data.stride(),
                                    int(data.storage_offset()), value.requires_grad,
                                    is_parameter, storage.nbytes(), data.device))
            return None
        plan = self.plan
        if plan is not None:  # compared field by field: no tuple per tensor per save
            if position < len(plan.signatures):
                expected = plan.signatures[position]
                if (expected[0] == index and expected[1] is data.dtype
                        and expected[2] == data.shape and expected[3] == data.stride()
                        and expected[4] == data.storage_offset()
                        and expected[5] is value.requires_grad
                        and expected[6] is is_parameter and expected[7] == storage.nbytes()
                        and expected[8] == data.device):
                    return plan.placeholders[position]
            self.plan = None  # the layout changed: the state is walked again for a new plan
        return None


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
        """Drop the arena (the next snapshot allocates a new one)."""
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
            self._plan = _make_plan(recorded,
                                    self._plan.arena if self._plan is not None else None)
            walk = _Walk(self._plan)
            copied = walk.copy(value)
            if not walk.matched:  # cannot happen: the state was not changed in between
                raise RuntimeError("the state changed while it was being snapshotted")
        plan = self._plan
        assert plan is not None
        events = _copy_storages(plan, walk.sources)
        return Snapshot(copied, plan.records, plan.nbytes, plan.arena, events)


def _make_plan(walk: _Walk, arena: torch.Tensor | None) -> _Plan:
    sources = walk.sources
    users: list[list[_Signature]] = [[] for _ in sources]
    for signature in walk.signatures:
        users[signature[0]].append(signature)
    offsets, total = [], 0
    for _, storage in sources:
        offsets.append(total)
        total += math.ceil(storage.nbytes() / ALIGNMENT) * ALIGNMENT
    pin = any(storage.device.type == "cuda" for _, storage in sources)
    if arena is None or arena.numel() < total or (pin and not arena.is_pinned()):
        arena = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=pin)
    arena_bytes, _ = host_view(arena.untyped_storage())
    records, refs, whole = [], [], []
    destinations: list[torch.Tensor | None] = []
    for index, ((tensor, storage), offset) in enumerate(zip(sources, offsets, strict=True)):
        size = storage.nbytes()
        key = str(index)
        records.append(StorageRecord(key, arena_bytes[offset:offset + size]))
        pickled_dtypes = {_pickled_dtype(signature[1]) for signature in users[index]}
        if len(pickled_dtypes) > 1:
            raise mixed_dtypes_error(*sorted(pickled_dtypes, key=str)[:2])
        (dtype,) = pickled_dtypes
        element = torch.empty((), dtype=dtype).element_size()
        refs.append(StorageRef(("storage", storage_type_of(dtype), key, location_tag(storage),
                                size // element)))
        covers = len(users[index]) == 1 and _covers_storage(tensor, size)
        whole.append(covers)
        if size == 0:
            destinations.append(None)
        elif covers:
            destinations.append(arena[offset:offset + size].view(tensor.dtype).view(tensor.shape))
        else:
            destinations.append(arena[offset:offset + size])
    placeholders = [_placeholder(signature, refs[signature[0]]) for signature in walk.signatures]
    devices = sorted({storage.device for _, storage in sources}, key=str)
    return _Plan(walk.signatures, placeholders, arena, destinations, whole, tuple(records),
                 total, devices)


def _pickled_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a storage is recorded with (``torch.uint8`` for untyped storages)."""
    return torch.uint8 if storage_type_of(dtype) is torch.UntypedStorage else dtype


def _covers_storage(tensor: torch.Tensor, size: int) -> bool:
    return (tensor.storage_offset() == 0 and tensor.is_contiguous()
            and tensor.numel() * tensor.element_size() == size)


def _placeholder(signature: _Signature, ref: StorageRef) -> StagedTensor:
    _, dtype, shape, stride, offset, requires_grad, is_parameter, _, _ = signature
    grad = requires_grad and not is_parameter
    if storage_type_of(dtype) is torch.UntypedStorage:
        reduction: tuple[Any, tuple[Any, ...]] = (
            _rebuild_tensor_v3, (ref, offset, tuple(shape), stride, grad, None, dtype))
    else:
        reduction = (_rebuild_tensor_v2, (ref, offset, tuple(shape), stride, grad, None))
    if is_parameter:  # as nn.Parameter.__reduce_ex__ writes it
        reduction = (_rebuild_parameter, (StagedTensor(reduction), requires_grad, OrderedDict()))
    return StagedTensor(reduction)


def _copy_storages(
    plan: _Plan, sources: Sequence[tuple[torch.Tensor, torch.UntypedStorage]]
) -> tuple[Any, ...]:
    """Copy every storage into the arena: one batched copy for CPU storages; CUDA copies are
    asynchronous (pinned destinations) and an event per device marks their end."""
    by_device: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for (tensor, storage), destination, whole in zip(sources, plan.destinations, plan.whole,
                                                     strict=True):
        if destination is None:
            continue
        source = tensor if whole else torch.empty(0, dtype=torch.uint8,
                                                  device=storage.device).set_(storage)
        targets, origins = by_device.setdefault(storage.device, ([], []))
        targets.append(destination)
        origins.append(source)
    events = []
    for device, (targets, origins) in by_device.items():
        if device.type == "cuda":  # device-to-host: one asynchronous copy each, in stream order
            with torch.cuda.device(device):
                for target, origin in zip(targets, origins, strict=True):
                    target.copy_(origin, non_blocking=True)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record()
                events.append(event)
        else:
            torch._foreach_copy_(targets, origins)
    return tuple(events)
