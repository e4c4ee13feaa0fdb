"""The format seam: how a checkpoint's payload becomes a file, and which writer does it.

A :class:`CheckpointIO` writes a payload (tensors and plain data, or a snapshot's value) to a
path atomically (:func:`~.writer.atomic_write`: temp file, fsync, rename, directory fsync) as a
zip in ``torch.save``'s format with an integrity record (:func:`~.integrity.integrity_record`)
as its comment, and returns the file's size. Every file either writer produces is read by the
same :func:`~.envelope.read_checkpoint` and opens with ``torch.load(weights_only=True)``.

- :class:`FastWriter` (``"fast"``): nnhandler's own pickler (:mod:`.pickling`) and zip writer
  (:mod:`.zipwriter`), several times cheaper than ``torch.save`` per tensor and per byte. It
  writes what ``torch.save`` writes by reproducing torch's private rebuild functions and
  storage classes, so it is used only where :func:`fast_writer_self_check` found that it does.
- :class:`TorchSaveWriter` (``"torch"``): ``torch.save`` itself, into a file object that
  computes the CRC-32 while torch writes; then the zip comment's length is set and the same
  integrity record appended. Slower, and independent of torch's internals.

Which one :func:`checkpoint_io` returns is decided by the environment variable
``NNHANDLER_WRITER``: ``auto`` (the default, also when unset or empty) chooses the fast writer
where its self-check passes and otherwise the torch.save writer, warning once
(:class:`WriterFallbackWarning`); ``fast`` and ``torch`` force one (``fast`` skips the check).

Snapshots for a background write (:mod:`.snapshot`) depend on the writer: the fast writer's hold
:class:`~.records.StagedTensor` placeholders that carry their pickled form, the torch.save
writer's hold real tensors over the staging memory. :attr:`CheckpointIO.pickled_snapshots` says
which; a snapshot remembers the writer it was taken for.

No torch private is touched when this module is imported: :mod:`.pickling` is imported on the
fast writer's first use, inside the self-check.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import IO, Any, BinaryIO, Final, cast

import torch
from torch import nn

from ..errors import ConfigurationError
from .integrity import crc32, integrity_record
from .packing import split_packs
from .records import StorageRecord, find_mixed_dtypes
from .writer import Destination, write_destination
from .zipwriter import WRITE_BUFFER, write_torch_zip

__all__ = [
    "WRITER_CHOICES",
    "WRITER_ENV",
    "CheckpointIO",
    "FastWriter",
    "SelfCheck",
    "TorchSaveWriter",
    "WriterFallbackWarning",
    "checkpoint_io",
    "fast_writer_self_check",
    "first_difference",
    "writer_choice",
]

#: the environment variable that chooses the checkpoint writer, and its values
WRITER_ENV: Final = "NNHANDLER_WRITER"
WRITER_CHOICES: Final = ("auto", "fast", "torch")
#: ``torch.serialization.DEFAULT_PROTOCOL``: the pickle protocol both writers write
_PICKLE_PROTOCOL: Final = 2


class WriterFallbackWarning(RuntimeWarning):
    """The fast writer failed its self-check on this torch: checkpoints are written with
    ``torch.save`` instead (the same files, written more slowly)."""


class CheckpointIO(ABC):
    """Writes a checkpoint payload to a file atomically, with an integrity record.

    Implementations write a zip that ``torch.load(weights_only=True)`` opens and
    :func:`~nnhandler.read_checkpoint` accepts: all records stored (uncompressed), the zip
    comment an :func:`~.integrity.integrity_record` of ``summary`` plus the size and CRC-32 of
    every byte before the comment's 2-byte length field; through
    :func:`~.writer.atomic_write`, so that the file is complete or absent.
    """

    #: the name ``NNHANDLER_WRITER`` chooses it by
    name: str
    #: whether a snapshot taken for this writer holds :class:`~.records.StagedTensor`
    #: placeholders (their storages passed as ``staged``) instead of real tensors
    pickled_snapshots: bool

    @abstractmethod
    def write(self, path: Destination, payload: Any, summary: Mapping[str, Any],
              staged: Sequence[StorageRecord] = (), *, pack: bool = False) -> int:
        """Write ``payload`` (checked tensors and plain data, or the value of a snapshot taken
        for this writer) to ``path`` (a file written atomically, or a stream such as an upload:
        :func:`~.writer.write_destination`); ``summary`` goes into the integrity record; ``staged``
        are the storage records of a snapshot's placeholders (writers with
        :attr:`pickled_snapshots` only). ``pack`` (a checkpoint envelope: a dict that
        :func:`~.packing.split_packs` is applied to on reading) allows packing small storages
        (:mod:`.packing`); writers that do not pack ignore it. Returns the file size in
        bytes."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FastWriter(CheckpointIO):
    """nnhandler's pickler and zip writer (:mod:`.pickling`, :mod:`.zipwriter`): pickled before
    any file is touched, written in large writes with the CRC-32 computed alongside."""

    name = "fast"
    pickled_snapshots = True

    def write(self, path: Destination, payload: Any, summary: Mapping[str, Any],
              staged: Sequence[StorageRecord] = (), *, pack: bool = False) -> int:
        pickled, storages = pickling_module().pickle_with_storages(payload, staged, pack=pack)

        def comment(covered_size: int, crc: int) -> bytes:
            return integrity_record(dict(summary), covered_size, crc)

        return write_destination(
            path, lambda file: write_torch_zip(file, pickled, storages, comment),
            buffering=WRITE_BUFFER)


class TorchSaveWriter(CheckpointIO):
    """``torch.save`` into a file object that checksums what torch writes (see
    :class:`_ChecksummingFile`); the zip comment is then set to the integrity record. A
    pickling error surfaces while the temp file is written; it is removed as on any failure.
    An error of the file (``ENOSPC``, ``EIO`` …) is raised as itself, not as the
    ``RuntimeError`` torch's zip writer turns it into."""

    name = "torch"
    pickled_snapshots = False

    def write(self, path: Destination, payload: Any, summary: Mapping[str, Any],
              staged: Sequence[StorageRecord] = (), *, pack: bool = False) -> int:
        # ``staged`` back the snapshot's tensors already (they view the staging memory);
        # ``pack`` is not for torch.save, which writes every storage as a record of its own
        def write(file: BinaryIO) -> int:
            out = _ChecksummingFile(file)
            try:
                # torch.save needs only ``write`` of a file object
                torch.save(payload, cast(IO[bytes], out), pickle_protocol=_PICKLE_PROTOCOL)
            except Exception as error:
                if out.failure is not None:
                    raise out.failure from None
                mixed = find_mixed_dtypes(payload)  # what torch refuses, named as we do
                if mixed is not None:
                    raise mixed from error
                raise
            return out.finish(lambda covered_size, crc: integrity_record(
                dict(summary), covered_size, crc))

        return write_destination(path, write, buffering=WRITE_BUFFER)


#: bytes held back from the file: the end-of-central-directory record (22 bytes, ending in the
#: comment length), checked and completed by :meth:`_ChecksummingFile.finish`
_EOCD_SIZE: Final = 22
_EOCD_SIGNATURE: Final = b"PK\x05\x06"


class _ChecksummingFile:
    """A write-only file object for ``torch.save``: every byte goes to ``file`` and into a
    running CRC-32, except the last :data:`_EOCD_SIZE` bytes written so far, held back until
    more follow. ``torch.save`` writes its zip sequentially (no seeks), so what is held at the
    end is its end-of-central-directory record, whose last two bytes are the comment length
    (0: torch writes no comment). :meth:`finish` writes the record but that field, then the
    length and the comment: the CRC covers every byte before the comment-length field, as the
    fast writer's does."""

    __slots__ = ("_file", "_held", "crc", "failure", "size")

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._held = b""
        self.crc = 0
        self.size = 0
        #: the first error of the file (torch's zip writer reports it as its own RuntimeError)
        self.failure: BaseException | None = None

    def _emit(self, data: bytes | memoryview) -> None:
        try:
            self._file.write(data)
        except BaseException as error:
            if self.failure is None:
                self.failure = error
            raise
        self.crc = crc32(data, self.crc)
        self.size += len(data)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        count = len(view)
        if count >= _EOCD_SIZE:
            if self._held:
                self._emit(self._held)
            self._emit(view[:count - _EOCD_SIZE])
            self._held = bytes(view[count - _EOCD_SIZE:])
        else:
            held = self._held + bytes(view)
            if len(held) > _EOCD_SIZE:
                self._emit(held[:-_EOCD_SIZE])
                held = held[-_EOCD_SIZE:]
            self._held = held
        return count

    def flush(self) -> None:
        self._file.flush()

    def finish(self, comment_for: Callable[[int, int], bytes]) -> int:
        """Write the held end record with ``comment_for(covered_size, crc)`` as its comment;
        returns the file size."""
        held = self._held
        if len(held) != _EOCD_SIZE or not held.startswith(_EOCD_SIGNATURE):
            raise RuntimeError(f"torch {torch.__version__} did not end its zip with an end "
                               f"record (last bytes {held!r}); set {WRITER_ENV}=fast")
        if held[-2:] != b"\x00\x00":
            raise RuntimeError(f"torch {torch.__version__} wrote a zip comment of "
                               f"{struct.unpack('<H', held[-2:])[0]} bytes; set "
                               f"{WRITER_ENV}=fast")
        self._emit(held[:-2])
        comment = comment_for(self.size, self.crc)
        if len(comment) > 0xFFFF:
            raise ValueError(f"a zip comment of {len(comment)} bytes exceeds 65535")
        self._file.write(struct.pack("<H", len(comment)) + comment)
        self._held = b""
        return self.size + 2 + len(comment)


FAST_WRITER: Final = FastWriter()
TORCH_SAVE_WRITER: Final = TorchSaveWriter()
_BY_NAME: Final[dict[str, CheckpointIO]] = {"fast": FAST_WRITER, "torch": TORCH_SAVE_WRITER}


def pickling_module() -> ModuleType:
    """:mod:`.pickling`, imported on first use (it binds torch privates as it is imported)."""
    from . import pickling

    return pickling


def writer_choice() -> str:
    """``NNHANDLER_WRITER`` (``"auto"`` when unset or empty); anything but ``auto``, ``fast``
    or ``torch`` is a :class:`~nnhandler.ConfigurationError` naming the value."""
    value = os.environ.get(WRITER_ENV, "")
    if value == "":
        return "auto"
    if value not in WRITER_CHOICES:
        raise ConfigurationError(
            f"{WRITER_ENV}={value!r} is not a checkpoint writer; choose one of "
            f"{', '.join(repr(choice) for choice in WRITER_CHOICES)} ('auto', the default: the "
            "fast writer where its self-check passes on this torch, else 'torch')")
    return value


def checkpoint_io(choice: str | None = None) -> CheckpointIO:
    """The writer for ``choice`` (``"auto"``, ``"fast"`` or ``"torch"``; ``None``: the value
    of ``NNHANDLER_WRITER``). ``auto`` runs :func:`fast_writer_self_check` once per process
    and falls back to the torch.save writer, with one :class:`WriterFallbackWarning`, where
    it fails."""
    if choice is None:
        choice = writer_choice()
    writer = _BY_NAME.get(choice)
    if writer is not None:
        return writer
    if choice != "auto":
        raise ConfigurationError(f"checkpoint writer {choice!r} is not one of "
                                 f"{', '.join(repr(name) for name in WRITER_CHOICES)}")
    return FAST_WRITER if fast_writer_self_check().passed else TORCH_SAVE_WRITER


# -- the self-check ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SelfCheck:
    """The outcome of :func:`fast_writer_self_check`: ``reason`` says what failed (``""``
    when it passed) on torch ``torch_version``."""

    passed: bool
    reason: str
    torch_version: str


_CHECKED: SelfCheck | None = None
_CHECK_LOCK: Final = threading.Lock()


def fast_writer_self_check() -> SelfCheck:
    """Whether the fast writer reproduces ``torch.save`` on this torch: run on first call (a
    round trip of a small representative state, a few milliseconds), cached for the process.
    A failure warns once (:class:`WriterFallbackWarning`, naming the reason and the torch
    version)."""
    global _CHECKED
    checked = _CHECKED
    if checked is not None:
        return checked
    with _CHECK_LOCK:
        if _CHECKED is None:
            _CHECKED = _self_check()
            if not _CHECKED.passed:
                warnings.warn(
                    f"nnhandler's fast checkpoint writer does not reproduce torch.save on torch "
                    f"{_CHECKED.torch_version} ({_CHECKED.reason}); checkpoints are written "
                    f"with torch.save instead (the same files, written more slowly). Please "
                    f"report it (README, 'Supported PyTorch versions'); {WRITER_ENV}=torch "
                    "chooses that writer without the check.",
                    WriterFallbackWarning, stacklevel=2)
        return _CHECKED


def representative_state() -> dict[str, Any]:
    """What the self-check writes: several dtypes (one without a legacy storage class where
    torch has it), storages shared by views with offsets and strides, 0-element and 0-d tensors,
    a parameter, a tensor that requires grad, nested containers, numbers beyond 32 bits, and an
    ``OrderedDict`` state dict with ``_metadata``."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    weights: OrderedDict[str, Any] = OrderedDict(
        weight=base, bias=torch.linspace(-1, 1, 3, dtype=torch.float64))
    weights._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    state: dict[str, Any] = {
        "base": base,
        "window": base[1:, 2:5],
        "transposed": base.t(),
        "row": base[2],
        "half": torch.tensor([0.5, -2.0, 65504.0], dtype=torch.float16),
        "bfloat16": torch.tensor([1.5, -3.0], dtype=torch.bfloat16),
        "int64": torch.tensor([-(2**40), 7]),
        "int8": torch.tensor([-128, 127], dtype=torch.int8),
        "uint8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "complex": torch.tensor([1 + 2j, -0.5j], dtype=torch.complex64),
        "empty": torch.zeros(0),
        "empty_matrix": torch.empty(0, 3, dtype=torch.int32),
        "scalar": torch.tensor(3.25),
        "grad": torch.ones(2, requires_grad=True),
        "parameter": nn.Parameter(torch.full((2,), 4.0)),
        "model": weights,
        "nested": {"list": [1, 2.5, "ü", None, True, (1, 2, 3, 4)], "tuple": (base[0], -5),
                   "big": 2**70, "negative": -(2**40), "bytes": b"\x00\xff",
                   "dtype": torch.float16, "size": torch.Size([2, 3]),
                   "device": torch.device("cpu"), 3: "int key"},
    }
    untyped = getattr(torch, "uint16", None)  # a dtype torch rebuilds with _rebuild_tensor_v3
    if isinstance(untyped, torch.dtype):
        state["uint16"] = torch.tensor([1, 65535], dtype=torch.int32).to(untyped)
    return state


def _self_check() -> SelfCheck:
    version = str(torch.__version__)
    try:
        reason = _round_trips()
    except Exception as error:  # a torch private renamed or gone: the fast path cannot work
        reason = f"{type(error).__name__}: {error}"
    return SelfCheck(not reason, reason, version)


def _round_trips() -> str:
    """The first difference between ``torch.save``'s and the fast writer's output, loaded
    with ``torch.load(weights_only=True)`` (the state pickled directly and from a snapshot;
    small storages packed and split again, :mod:`.packing`); ``""`` when there is none."""
    from .snapshot import StagingBuffers

    pickling = pickling_module()  # first: a torch private it binds may be gone
    state = representative_state()
    reference = io.BytesIO()
    torch.save(state, reference, pickle_protocol=_PICKLE_PROTOCOL)
    expected = torch.load(io.BytesIO(reference.getvalue()), weights_only=True)
    staging = StagingBuffers()
    try:
        snapshot = staging.take(state, io=FAST_WRITER)
        snapshot.wait()
        for label, value, staged in (("written directly", state, ()),
                                     ("written from a snapshot", snapshot.value,
                                      snapshot.records)):
            pickled, storages = pickling.pickle_with_storages(value, staged, pack=True)
            written = io.BytesIO()
            write_torch_zip(written, pickled, storages, lambda size, crc: b"")
            actual = split_packs(torch.load(io.BytesIO(written.getvalue()), weights_only=True))
            difference = first_difference(expected, actual)
            if difference:
                return f"a state {label}: {difference}"
    finally:
        staging.release()
    return ""


def first_difference(expected: Any, actual: Any, where: str = "state") -> str:
    """The first difference between two loaded checkpoint values (``""`` if none): types,
    container keys and order, ``OrderedDict`` attributes, numbers bit for bit, and per tensor
    its type, dtype, shape, stride, offset, ``requires_grad`` and storage bytes; then whether the
    same tensors share storages."""
    expected_storages: dict[str, int] = {}
    actual_storages: dict[str, int] = {}
    difference = _difference(expected, actual, where, expected_storages, actual_storages)
    if difference:
        return difference
    return _sharing_difference(expected_storages, actual_storages)


def _difference(expected: Any, actual: Any, where: str, expected_storages: dict[str, int],
                actual_storages: dict[str, int]) -> str:
    kind = type(expected)
    if type(actual) is not kind:
        return f"{where} is a {type(actual).__qualname__}, expected a {kind.__qualname__}"
    if isinstance(expected, torch.Tensor):
        return _tensor_difference(expected, actual, where, expected_storages, actual_storages)
    if isinstance(expected, dict):
        if list(expected) != list(actual):
            return f"{where} has keys {list(actual)!r:.200}, expected {list(expected)!r:.200}"
        for key, item in expected.items():
            found = _difference(item, actual[key], f"{where}[{key!r}]", expected_storages,
                                actual_storages)
            if found:
                return found
        if kind is OrderedDict:
            return _difference(dict(vars(expected)), dict(vars(actual)), f"{where}.__dict__",
                               expected_storages, actual_storages)
        return ""
    if isinstance(expected, (list, tuple)):
        if len(expected) != len(actual):
            return f"{where} has {len(actual)} items, expected {len(expected)}"
        for index, (item, other) in enumerate(zip(expected, actual, strict=True)):
            found = _difference(item, other, f"{where}[{index}]", expected_storages,
                                actual_storages)
            if found:
                return found
        return ""
    if kind is float:
        same = struct.pack("<d", expected) == struct.pack("<d", actual)
    else:
        same = bool(expected == actual)
    return "" if same else f"{where} is {actual!r:.80}, expected {expected!r:.80}"


def _tensor_difference(expected: torch.Tensor, actual: torch.Tensor, where: str,
                       expected_storages: dict[str, int], actual_storages: dict[str, int]) -> str:
    for name, read in _TENSOR_PROPERTIES:
        if read(expected) != read(actual):
            return f"{where} has {name} {read(actual)}, expected {read(expected)}"
    expected_bytes, actual_bytes = _storage_bytes(expected), _storage_bytes(actual)
    if not torch.equal(expected_bytes, actual_bytes):
        return f"{where}'s storage holds other bytes"
    if expected_bytes.numel():
        expected_storages[where] = expected_bytes.data_ptr()
        actual_storages[where] = actual_bytes.data_ptr()
    return ""


_TENSOR_PROPERTIES: Final[tuple[tuple[str, Callable[[torch.Tensor], Any]], ...]] = (
    ("dtype", lambda tensor: tensor.dtype),
    ("shape", lambda tensor: tuple(tensor.shape)),
    ("stride", lambda tensor: tensor.stride()),
    ("storage offset", lambda tensor: tensor.storage_offset()),
    ("requires_grad", lambda tensor: tensor.requires_grad),
    ("device", lambda tensor: tensor.device),
    ("storage size", lambda tensor: tensor.untyped_storage().nbytes()),
)


def _storage_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """All bytes of ``tensor``'s storage, as a flat ``uint8`` tensor over it."""
    storage = tensor.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _sharing_difference(expected: dict[str, int], actual: dict[str, int]) -> str:
    """Whether the tensors at the same places share storages the same way."""

    def groups(storages: dict[str, int]) -> set[frozenset[str]]:
        by_storage: dict[int, set[str]] = {}
        for where, pointer in storages.items():
            by_storage.setdefault(pointer, set()).add(where)
        return {frozenset(places) for places in by_storage.values()}

    expected_groups, actual_groups = groups(expected), groups(actual)
    if expected_groups == actual_groups:
        return ""
    wrong = sorted(min(group) for group in expected_groups ^ actual_groups)
    return f"storage sharing differs around {wrong[0]}"

