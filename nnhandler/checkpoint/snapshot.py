"""Snapshots of a checkpoint's state into reusable host memory, for writing in the background.

:meth:`StagingBuffers.take` deep-copies the containers of a state (dicts, ``OrderedDict`` with
its attributes such as a state dict's ``_metadata``, lists, tuples; numbers and strings are
immutable and shared) and copies the data of every tensor storage into one host *arena* (pinned
when a storage lives on CUDA): one ``torch.cat`` for the small CPU storages, one batched copy
for the large ones, asynchronous copies on the current stream for CUDA ones.
What each tensor becomes in the copy depends on the writer the snapshot is taken for
(:class:`~.io.CheckpointIO`): for the fast writer a :class:`StagedTensor` that carries its
pickled form, exactly as the live tensor pickles (same storages and sharing, offsets, sizes,
strides, dtype, ``requires_grad``, the live storage's location such as ``cuda:0``); for the
torch.save writer a real CPU tensor (or ``nn.Parameter``) with the same dtype, shape, stride,
offset and ``requires_grad`` over a storage of its own in the staging memory, shared by the
tensors that share the live storage. Either way a file written from a snapshot holds the same
content as a synchronous save of the same state (with the torch.save writer, tensors of device
storages are recorded as CPU tensors: ``NNHandler.load`` maps them to its device anyway).

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
from .io import CheckpointIO, checkpoint_io, pickling_module
from .records import StagedTensor, StorageRecord, mixed_dtypes_error, recorded_dtype
from .zipwriter import DIRECT_FROM, host_view

__all__ = ["Snapshot", "StagedTensor", "StagingBuffers"]

_STRIDED: Final = torch.strided
#: large and device storages start at multiples of this in the arena (cache lines; what the
#: zip writer needs to line a record up with file blocks)
_ARENA_ALIGNMENT: Final = 64


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
    """A state copied into host memory for the writer ``io``: ``value`` holds placeholders
    (:class:`StagedTensor`, or tensors over the arena, see the module docstring) whose data are
    ``records`` (views of the arena). Call :meth:`wait` before reading the data: device copies
    may still be in flight. Write it with ``io`` (``write_envelope(..., io=snapshot.io)``)."""

    value: Any
    records: tuple[StorageRecord, ...]
    nbytes: int
    #: the host memory ``records`` view (the views alone do not keep it alive)
    arena: torch.Tensor
    io: CheckpointIO
    events: tuple[Any, ...] = ()

    def wait(self) -> None:
        for event in self.events:
            event.synchronize()


@dataclass
class _Plan:
    signatures: list[_Signature]
    #: per tensor position: a StagedTensor (pickled snapshots) or a tensor over the arena
    placeholders: list[Any]
    arena: torch.Tensor
    records: tuple[StorageRecord, ...]
    nbytes: int
    #: per storage: the live storage (kept, so that its ``_cdata`` stays its own) and a flat
    #: byte view of it (the copy source)
    storages: list[torch.UntypedStorage]
    sources: list[torch.Tensor]
    #: per tensor position: the ``_cdata`` of the storage planned for it
    cdatas: list[int]
    #: per tensor position: what a plain tensor there must show, as one tuple — (dtype,
    #: shape, stride, offset, requires_grad, storage bytes, storage ``_cdata``); ``None``
    #: where a parameter is planned
    expected: list[tuple[Any, ...] | None]
    #: per storage: the number of tensor positions that use it, and the first of them
    users: list[int]
    first_user: list[int]
    #: ``_cdata`` of every planned storage
    known: set[int]
    #: the placeholders are :class:`StagedTensor` (for a writer with ``pickled_snapshots``)
    pickled: bool
    #: the small CPU storages' sources in arena order and the front of the arena they fill
    #: back to back (one ``torch.cat``); the place of each small storage index in that list
    small_sources: list[torch.Tensor]
    small_region: torch.Tensor | None
    small_position: dict[int, int]
    #: large CPU storages and storages on other devices: (storage index, destination)
    large: list[tuple[int, torch.Tensor]]
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
            copied: dict[Any, Any] = kind()
            if self.plan is not None and not self.failed:
                return self._checked_mapping(value, copied)
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

    def _checked_mapping(self, value: dict[Any, Any], copied: dict[Any, Any]) -> Any:
        """:meth:`copy` of a mapping while a plan is in use: the check of a plain tensor
        against the plan inlined (one tuple comparison); anything else, and any tensor that
        does not match at once, takes the general way (:meth:`tensor` may swap or fail)."""
        plan = self.plan
        assert plan is not None
        expected, placeholders = plan.expected, plan.placeholders
        count = len(expected)
        position = self.position
        leaves, strided = PLAIN_LEAF_TYPES, _STRIDED
        for key, item in value.items():
            item_kind = type(item)
            if item_kind is torch.Tensor:
                if (position < count and item.layout is strided and not item.is_quantized
                        and not item.is_nested and (item.is_cpu or item.is_cuda)
                        and not item.is_conj() and not item.is_neg() and not item.__dict__):
                    storage = item.untyped_storage()
                    if (item.dtype, item.shape, item.stride(), item.storage_offset(),
                            item.requires_grad, storage.nbytes(),
                            storage._cdata) == expected[position]:
                        copied[key] = placeholders[position]
                        position += 1
                        continue
                self.position = position
                copied[key] = self.tensor(item)
                position = self.position
            elif item_kind in leaves:
                copied[key] = item
            else:
                self.position = position
                copied[key] = self.copy(item)
                position = self.position
        self.position = position
        if type(value) is OrderedDict:
            attributes = vars(value)
            if attributes:  # a state dict's _metadata
                vars(copied).update(self.copy(dict(attributes)))
        return copied

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

    def take(self, value: Any, io: CheckpointIO | None = None) -> Snapshot:
        """Copy ``value`` (checked plain data: see ``ensure_plain``) into host memory, for
        the writer ``io`` (``None``: :func:`~.io.checkpoint_io`'s choice).

        Blocks only for the copies of CPU storages; device-to-host copies are queued on the
        current stream and :meth:`Snapshot.wait` waits for them.
        """
        writer = io if io is not None else checkpoint_io()
        pickled = writer.pickled_snapshots
        if self._plan is not None and self._plan.pickled is not pickled:
            self._plan = None  # planned for the other kind of writer
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
            self._plan = _make_plan(recorded, layout, arena, pickled)
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
        return Snapshot(copied, plan.records, plan.nbytes, plan.arena, writer, events)


def _alias(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat ``uint8`` tensor over all of ``storage``'s bytes."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class _Layout:
    """Where each storage goes in the arena: small CPU storages back to back at the front (one
    ``torch.cat``), then large CPU storages (:data:`~.zipwriter.DIRECT_FROM` bytes and more;
    one batched copy) and device storages (pinned memory), each of these at a multiple of
    ``_ARENA_ALIGNMENT``, so that the zip writer can line them up with file blocks."""

    def __init__(self, storages: list[torch.UntypedStorage]) -> None:
        sizes = [storage.nbytes() for storage in storages]
        on_host = [storage.device.type == "cpu" for storage in storages]
        self.small = [i for i, size in enumerate(sizes) if on_host[i] and size < DIRECT_FROM]
        self.large = [i for i, size in enumerate(sizes) if on_host[i] and size >= DIRECT_FROM]
        self.device = [i for i in range(len(storages)) if not on_host[i]]
        self.offsets = [0] * len(storages)
        total = 0
        for index in self.small:
            self.offsets[index] = total
            total += sizes[index]
        self.small_total = total
        for index in self.large + self.device:
            total = math.ceil(total / _ARENA_ALIGNMENT) * _ARENA_ALIGNMENT
            self.offsets[index] = total
            total += sizes[index]
        self.total = total
        self.pin = bool(self.device)

    def fits(self, arena: torch.Tensor) -> bool:
        return arena.numel() >= self.total and (arena.is_pinned() or not self.pin)


def _make_plan(walk: _Walk, layout: _Layout, arena: torch.Tensor | None,
               pickled: bool) -> _Plan:
    """The copy sources and the placeholders (:class:`StagedTensor` where ``pickled``, else
    tensors over the arena) for the storages ``walk`` recorded, in ``arena`` (allocated here
    when ``None``)."""
    sources = walk.sources
    signatures = walk.signatures
    storages = [storage for _, storage in sources]
    per_storage: list[list[_Signature]] = [[] for _ in sources]
    first_user = [0] * len(sources)
    for position, signature in enumerate(signatures):
        if not per_storage[signature.storage_index]:
            first_user[signature.storage_index] = position
        per_storage[signature.storage_index].append(signature)
    offsets, total = layout.offsets, layout.total
    if arena is None:
        arena = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=layout.pin)
    arena_bytes, _ = host_view(arena.untyped_storage())
    records, dtypes, aliases = [], [], []
    for index, (storage, offset) in enumerate(zip(storages, offsets, strict=True)):
        size = storage.nbytes()
        records.append(StorageRecord(str(index), arena_bytes[offset:offset + size]))
        pickled_dtypes = {recorded_dtype(signature.dtype) for signature in per_storage[index]}
        if len(pickled_dtypes) > 1:
            raise mixed_dtypes_error(*sorted(pickled_dtypes, key=str)[:2])
        dtypes.append(pickled_dtypes.pop())
        aliases.append(_alias(storage))
    placeholders = (_staged_placeholders(signatures, records, dtypes, storages) if pickled
                    else _tensor_placeholders(signatures, records))

    def destination(index: int) -> torch.Tensor:
        size = storages[index].nbytes()
        return arena[offsets[index]:offsets[index] + size].view(_word(size))

    return _Plan(
        signatures, placeholders, arena, tuple(records), total, storages, aliases,
        cdatas=[storages[signature.storage_index]._cdata for signature in signatures],
        expected=[_expected(signature, storages[signature.storage_index]._cdata)
                  for signature in signatures],
        users=[len(users) for users in per_storage],
        first_user=first_user,
        known={storage._cdata for storage in storages},
        pickled=pickled,
        small_sources=[aliases[index] for index in layout.small],
        small_region=arena[:layout.small_total] if layout.small_total else None,
        small_position={index: position for position, index in enumerate(layout.small)},
        large=[(index, destination(index)) for index in layout.large],
        device_copies=[(index, destination(index)) for index in layout.device
                       if storages[index].nbytes()],
    )


def _expected(signature: _Signature, cdata: int) -> tuple[Any, ...] | None:
    if signature.is_parameter:
        return None
    return (signature.dtype, signature.shape, signature.stride, signature.offset,
            signature.requires_grad, signature.storage_bytes, cdata)


def _word(size: int) -> torch.dtype:
    """The widest integer type whose size divides ``size``: a large copy as fewer, wider
    elements."""
    for dtype in (torch.int64, torch.int32, torch.int16):
        if size % dtype.itemsize == 0:
            return dtype
    return torch.uint8


def _swap_storage(plan: _Plan, index: int, storage: torch.UntypedStorage) -> None:
    """Put ``storage`` in the place of planned storage ``index`` (same size and device, one
    user): the copy reads from it from now on."""
    old = plan.storages[index]
    plan.known.discard(old._cdata)
    plan.known.add(storage._cdata)
    user = plan.first_user[index]  # its only user
    plan.cdatas[user] = storage._cdata
    plan.expected[user] = _expected(plan.signatures[user], storage._cdata)
    plan.storages[index] = storage
    plan.sources[index] = _alias(storage)
    position = plan.small_position.get(index)
    if position is not None:
        plan.small_sources[position] = plan.sources[index]


def _staged_placeholders(signatures: list[_Signature], records: list[StorageRecord],
                         dtypes: list[torch.dtype],
                         storages: list[torch.UntypedStorage]) -> list[Any]:
    """The fast writer's placeholders: each tensor's pickled form over its storage record,
    recorded with the live storage's location."""
    pickling = pickling_module()
    refs = []
    for record, dtype, storage in zip(records, dtypes, storages, strict=True):
        refs.append(pickling.storage_ref(pickling.storage_type_of(dtype), record.key,
                                         location_tag(storage), storage.nbytes() // dtype.itemsize))
    placeholders = []
    for signature in signatures:
        grad = signature.requires_grad and not signature.is_parameter
        pieces = pickling.tensor_pieces(refs[signature.storage_index], signature.dtype,
                                        signature.offset, signature.shape, signature.stride,
                                        grad)
        if signature.is_parameter:  # as nn.Parameter.__reduce_ex__ writes it
            pieces = pickling.parameter_pieces(pieces, signature.requires_grad)
        placeholders.append(StagedTensor(pieces))
    return placeholders


def _tensor_placeholders(signatures: list[_Signature],
                         records: list[StorageRecord]) -> list[Any]:
    """The torch.save writer's placeholders: CPU tensors over a storage per record (a view of
    the arena's bytes: ``torch.save`` writes each storage once, as it would the live one), with
    the live tensors' dtype, shape, stride, offset and ``requires_grad``."""
    bases = []
    for record in records:
        data = record.data
        assert isinstance(data, memoryview)
        bases.append(torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if data.nbytes
                     else torch.empty(0, dtype=torch.uint8).untyped_storage())
    placeholders: list[Any] = []
    for signature in signatures:
        tensor = torch.empty(0, dtype=signature.dtype).set_(
            bases[signature.storage_index], signature.offset, signature.shape, signature.stride)
        if signature.is_parameter:
            placeholders.append(nn.Parameter(tensor, requires_grad=signature.requires_grad))
        else:
            placeholders.append(tensor.requires_grad_(signature.requires_grad))
    return placeholders


def _copy_storages(plan: _Plan) -> tuple[Any, ...]:
    """Copy every storage into the arena: the small CPU storages with one ``torch.cat`` (a
    loop over them in C++; a copy per storage would cost a dispatch each), run on one thread
    (torch's multi-threaded path for it took twice as long here), the large ones with one
    batched copy (each spread over torch's threads); CUDA copies are asynchronous (pinned
    destinations) and an event per device marks their end."""
    if plan.small_region is not None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            torch.cat(plan.small_sources, out=plan.small_region)
        finally:
            torch.set_num_threads(threads)
    if plan.large:
        torch._foreach_copy_([destination for _, destination in plan.large],
                             [plan.sources[index].view(destination.dtype)
                              for index, destination in plan.large])
    by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for index, destination in plan.device_copies:
        by_device.setdefault(plan.storages[index].device, []).append((index, destination))
    events = []
    for device, copies in by_device.items():  # device-to-host: asynchronous, in stream order
        with torch.cuda.device(device):
            for index, destination in copies:
                destination.copy_(plan.sources[index].view(destination.dtype), non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
            events.append(event)
    return tuple(events)
