"""The checkpoint envelope: one ``.pth`` that ``torch.load(path, weights_only=True)`` opens.

Top level: ``format`` (name and version), ``meta`` (epoch, step, logs, world size, versions,
time) and ``state`` (one entry per state key). Nothing is pickled but tensors and plain data.
Files are written by a :class:`~.io.CheckpointIO` (the fast writer, or ``torch.save``: see
:mod:`.io`); every one of them is read by :func:`read_checkpoint`.
"""

from __future__ import annotations

import datetime as _dt
import os
import pickle
import platform
from collections import OrderedDict
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Final, cast

import torch

from ..errors import CheckpointError, CheckpointFormatError
from .format import FORMAT_NAME, FORMAT_VERSION, Checkpoint, unpack
from .integrity import corruption, read_integrity_record, verify_file
from .io import CheckpointIO, checkpoint_io
from .mapped_read import can_map, crc32_through_storages, detach_from_file, mapped_crc32
from .packing import split_packs
from .records import StorageRecord
from .verified_read import CheckingReader
from .writer import Destination
from .ziplayout import check_zip_layout

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Checkpoint",
    "envelope_of",
    "read_checkpoint",
    "write_checkpoint",
    "write_envelope",
    "write_with_record",
]


def library_versions() -> dict[str, str]:
    from .. import __version__

    return {
        "nnhandler": __version__,
        "torch": str(torch.__version__),  # TorchVersion is a str subclass weights_only refuses
        "python": platform.python_version(),
    }


def build_meta(*, epoch: int, step: int, logs: dict[str, Any], world_size: int,
               lineage: str = "") -> dict[str, Any]:
    """The ``meta`` section. ``lineage`` names the run that writes the file (``run:<id>``,
    see :attr:`~nnhandler.components.history.Progress.lineage`; ``""``: no run yet): auto-save
    replaces or removes only files of its own lineage (:mod:`.removal`)."""
    return {
        "epoch": epoch,
        "step": step,
        "logs": logs,
        "world_size": world_size,
        "lineage": lineage,
        "versions": library_versions(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


#: immutable values a checkpoint may hold (shared, never copied, by snapshots)
PLAIN_LEAF_TYPES: Final = frozenset({bool, int, float, str, bytes, type(None), torch.dtype,
                                 torch.Size, torch.device})
_KEY_TYPES: Final = frozenset({str, int, float, bool, type(None)})
_MAPPINGS: Final = frozenset({dict, OrderedDict})
_SEQUENCES: Final = frozenset({list, tuple})


#: integers longer than this pickle as LONG4, which ``torch.load(weights_only=True)`` refuses
MAX_INT_BITS: Final = 8 * 255 - 1


def _is_plain_key(key: Any) -> bool:
    kind = type(key)
    return kind in _KEY_TYPES and (kind is not int or key.bit_length() <= MAX_INT_BITS)


def _is_plain(value: Any) -> bool:
    kind = type(value)
    if kind is int:
        return bool(value.bit_length() <= MAX_INT_BITS)
    if kind is bytes:  # b"" pickles as a call of builtins.bytes, which weights_only refuses
        return bool(value)
    if kind in PLAIN_LEAF_TYPES or isinstance(value, torch.Tensor):
        return True
    if kind in _MAPPINGS:
        for key, item in value.items():  # a loop, not all(): state dicts are long
            if type(key) is not str and not _is_plain_key(key):
                return False
            if type(item) is not torch.Tensor and not _is_plain(item):
                return False
        return kind is dict or not vars(value) or _is_plain(dict(vars(value)))
    if kind in _SEQUENCES:
        for item in value:
            item_kind = type(item)
            if item_kind is torch.Tensor or (item_kind is int
                                             and item.bit_length() <= MAX_INT_BITS):
                continue
            if not _is_plain(item):
                return False
        return True
    return False


def ensure_plain(value: Any, where: str = "state") -> None:
    """Raise :class:`CheckpointError` naming the first value ``torch.load(weights_only=True)``
    would refuse, so that no unloadable file is ever written."""
    if not _is_plain(value):  # the fast check; the path to the culprit is found only on failure
        raise refusal(value, where)


def refusal(value: Any, where: str) -> CheckpointError:
    """The error naming the first value inside ``value`` that a checkpoint cannot hold."""
    kind = type(value)
    if kind in _MAPPINGS:
        for key, item in value.items():
            if type(key) not in _KEY_TYPES:
                return CheckpointError(f"{where} has a key of type {type(key).__qualname__}: "
                                       f"{key!r}; checkpoint keys must be str or numbers")
            if not _is_plain_key(key):
                return refusal(key, f"{where} key")
            if not _is_plain(item):
                return refusal(item, f"{where}[{key!r}]")
        if kind is OrderedDict:  # its attributes are written too (a state dict's _metadata)
            for name, item in vars(value).items():
                if not _is_plain(item):
                    return refusal(item, f"{where}.{name}")
    elif kind in _SEQUENCES:
        for index, item in enumerate(value):
            if not _is_plain(item):
                return refusal(item, f"{where}[{index}]")
    if kind is bytes:
        return CheckpointError(
            f"{where} is an empty bytes value (b''): torch.load(weights_only=True) cannot read "
            "one back (it pickles as a call of builtins.bytes); store None or a non-empty value")
    if kind is int:
        return CheckpointError(
            f"{where} is an integer of {value.bit_length()} bits; checkpoints hold integers of "
            f"up to {MAX_INT_BITS} bits (torch.load(weights_only=True) refuses longer ones)")
    return CheckpointError(
        f"{where} is a {kind.__module__}.{kind.__qualname__} ({value!r:.80}); checkpoints hold "
        "only tensors, numbers, strings, None and lists/tuples/dicts of them, so that they load "
        "with torch.load(weights_only=True). Convert it in the provider's state_dict()."
    )


def envelope_of(state: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The object a checkpoint file holds."""
    return {"format": {"name": FORMAT_NAME, "version": FORMAT_VERSION}, "meta": meta,
            "state": state}


def write_checkpoint(path: Destination, state: dict[str, Any], meta: dict[str, Any], *,
                     io: CheckpointIO | None = None) -> int:
    """Write the envelope atomically to ``path`` (or into a stream that publishes it whole:
    :data:`~.writer.Destination`) with ``io`` (``None``: the writer
    ``NNHANDLER_WRITER`` chooses, see :func:`~.io.checkpoint_io`); returns its size in bytes.

    Raises :class:`CheckpointError` (before anything is written) if the state holds anything but
    tensors and plain data.
    """
    ensure_plain(state)
    ensure_plain(meta, "meta")
    return write_envelope(path, envelope_of(state, meta), io=io)


def write_envelope(
    path: Destination, envelope: dict[str, Any], staged: Sequence[StorageRecord] = (), *,
    io: CheckpointIO | None = None,
) -> int:
    """Write a checked envelope durably with its integrity record through ``io`` (see
    :func:`write_with_record`). ``staged`` are the storage records of a snapshot's
    placeholders (see :mod:`.snapshot`; pass the snapshot's ``io`` with them). Returns the
    file size."""
    meta = envelope["meta"]
    summary = {
        "format_version": envelope["format"]["version"],
        "epoch": meta["epoch"],
        "step": meta["step"],
        "time": meta["time"],
        "logs": meta["logs"],
    }
    if "lineage" in meta:  # read back by a tail read before any replacement or removal
        summary["lineage"] = meta["lineage"]
    return write_with_record(path, envelope, summary, staged, io=io, pack=True)


def write_with_record(path: Destination, payload: Any, summary: dict[str, Any],
                      staged: Sequence[StorageRecord] = (), *,
                      io: CheckpointIO | None = None, pack: bool = False) -> int:
    """Write ``payload`` (tensors and plain data) as a torch zip file that
    ``torch.load(weights_only=True)`` opens, with an integrity record holding ``summary``,
    durably through :func:`~.writer.atomic_write`, with ``io`` (``None``: the writer
    ``NNHANDLER_WRITER`` chooses, see :func:`~.io.checkpoint_io`). ``pack``: small storages
    may be packed (:mod:`.packing`; envelopes only, which :func:`read_checkpoint` splits
    again). Returns the file size."""
    writer = io if io is not None else checkpoint_io()
    return writer.write(path, payload, summary, staged, pack=pack)


def read_checkpoint(
    path: str | os.PathLike[str], map_location: Any = None, *, verify: bool = True,
    mmap: bool = False, copied: Collection[str] = (),
) -> Checkpoint:
    """Read and check an envelope; never executes code from the file.

    With ``verify`` (the default) the integrity record at the file's end is checked first (a
    truncated file fails here), then the whole file is checked against its CRC-32 in the same
    read that loads it (``nnhandler.checkpoint.verified_read``: the CRC of each large record
    is computed on the tensor storage it was read into); any damage raises
    :class:`CheckpointCorruptedError` and no data is returned. Before ``torch.load`` opens
    it, verified or not, the zip's central directory is checked (:mod:`.ziplayout`):
    compressed records, records beyond the file or overlapping each other are a
    :class:`CheckpointFormatError` (or, where the CRC fails too, corruption) and nothing is
    inflated. ``mmap`` maps the tensors' storages instead of reading them (for checking what
    a file holds without loading it); with ``verify`` the file is checked completely before
    it is mapped.

    ``copied`` names state keys whose tensors the caller copies into live tensors and then
    drops (``NNHandler.load`` and ``resume_from``: ``"model"``). A verified read then opens
    the file with ``mmap=True``, checks the CRC-32 through that mapping before anything is
    copied off it and leaves those tensors as views of it, to be copied once, straight into
    the model; every other tensor is in memory of its own as usual
    (``nnhandler.checkpoint.mapped_read``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    mapped = bool(copied) and not mmap and can_map(path)
    if not verify:
        check_zip_layout(path)  # nothing is inflated or allocated on a hostile layout's word
        if mapped:
            return _read_mapped(path, map_location, copied)
        return unpack(path, split_packs(_load_envelope(path, path, map_location, mmap),
                                        clone=not mmap))
    record = read_integrity_record(path)
    if mmap:  # nothing is read to check on the way: check first
        verify_file(path)
        check_zip_layout(path)
        return unpack(path, split_packs(_load_envelope(path, path, map_location, mmap),
                                        clone=False))
    try:
        check_zip_layout(path)
        if mapped:
            return _read_mapped(path, map_location, copied, record)
        with CheckingReader(path) as reader:
            envelope = _load_envelope(reader, path, map_location)
            size, crc = reader.file_crc32(int(record["covered_size"]))
    except CheckpointError:
        verify_file(path)  # damage explains the failure: report it as such
        raise
    if size != record["covered_size"] or crc != record["crc32"]:
        raise corruption(path, crc, int(record["crc32"]))
    return unpack(path, split_packs(envelope, clone=True))


def _read_mapped(path: Path, map_location: Any, copied: Collection[str],
                 record: dict[str, Any] | None = None) -> Checkpoint:
    """The envelope read with ``mmap=True``, every tensor not under ``copied`` given memory of
    its own (:func:`~.mapped_read.detach_from_file`), the packs split apart. With the
    integrity ``record``, the CRC-32 is checked first, through torch's own mapping of the file
    (:func:`~.mapped_read.crc32_through_storages`) before any tensor is copied off it; on a
    mapping of its own where the storages do not match the records, and again there before
    a mismatch is reported (the file, not the matching, decides). The caller reports a
    failure to open a damaged file as damage (``verify_file``)."""
    envelope = _load_envelope(path, path, map_location, mmap=True)
    if record is not None:
        covered, expected = int(record["covered_size"]), int(record["crc32"])
        counted = crc32_through_storages(path, covered, envelope)
        if counted != (covered, expected):
            counted = mapped_crc32(path, covered)
        if counted != (covered, expected):
            raise corruption(path, counted[1], expected)
    if type(envelope) is dict:
        detach_from_file(envelope, copied)
    return unpack(path, split_packs(envelope, clone=True))


def _load_envelope(source: Path | CheckingReader, path: Path, map_location: Any,
                   mmap: bool = False) -> Any:
    try:
        # torch.load reads any object with read/readinto/seek/tell (typed as IO[bytes])
        file = cast(BinaryIO, source) if isinstance(source, CheckingReader) else source
        return torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise CheckpointFormatError(
            f"{str(path)!r} holds objects other than tensors and plain data and was refused "
            f"(nnhandler never unpickles code): {error}"
        ) from error
    except Exception as error:  # a damaged file (verify=False) can fail in any unpickling step
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {error}") from error
