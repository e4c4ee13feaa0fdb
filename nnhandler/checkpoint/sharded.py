"""Sharded checkpoints: one directory per checkpoint, written by every rank, committed atomically.

Layout of ``NAME.dcp/``::

    .metadata          DCP's index of every tensor shard (written by rank 0)
    __<rank>_<n>.distcp  each rank's shards of the model and optimizer tensors (DCP)
    nnhandler.pth      the envelope (format, meta, every other state; rank 0), plus the plain,
                       non-tensor part of the model and optimizer state
    manifest.json      size and CRC-32 of every file above, epoch/step/time/logs, world size
                       and the format version; itself guarded by a CRC-32 (written last)

In object storage (:mod:`.remote_sharded`) the files other than ``manifest.json`` lie one
level down, under a generation prefix the manifest names (``NAME.dcp/g-<hex>/…``): a store
without rename publishes a new checkpoint of the same name by putting its manifest, never by
touching the previous generation's files first.

Every rank writes its shards into a hidden temp directory beside the final name (named like the
temp files of :func:`~nnhandler.checkpoint.writer.atomic_write`, so the stale-temp cleanup
removes one a crash left behind); the ranks checksum the files between them; rank 0 writes the
envelope and the manifest, fsyncs, and renames the directory to its final name. An existing
checkpoint of that name is swapped out atomically (``renameat2(RENAME_EXCHANGE)`` on Linux)
and then removed. A crash therefore never leaves a partial directory under the final name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, Final, Literal, TypeVar

from pydantic import AfterValidator, Field

from ..errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointFormatError,
    ConfigurationError,
)
from .format import Checkpoint
from .integrity import IntegrityRecord, crc32, file_crc32
from .schema import LogValue, Schema, validate
from .storage import URL
from .writer import atomic_write, fsync_directory, remove_checkpoint_path, temp_path_for

if TYPE_CHECKING:  # DCP is imported only when a sharded checkpoint is written or loaded,
    # torch only when one is written, read, or verified collectively (nnhandler verify: never)
    from ..distributed import DistributedContext
    from .dcp_state import ShardedComponents

#: a sharded checkpoint's place: a local folder or a prefix in object storage
Location = TypeVar("Location", Path, URL)

__all__ = [
    "ENVELOPE_FILE",
    "MANIFEST_FILE",
    "SHARDED_KEYS",
    "SHARDED_SUFFIX",
    "ShardedCheckpoint",
    "checkpoint_size",
    "checksum_problem",
    "describe_sharded",
    "files_directory",
    "load_sharded_state",
    "manifest_bytes",
    "parse_manifest",
    "read_any_checkpoint",
    "read_manifest",
    "read_sharded_checkpoint",
    "sharded_name",
    "verify_sharded",
    "write_sharded_checkpoint",
]

SHARDED_SUFFIX: Final = ".dcp"
#: State keys whose tensors are written through DCP (the rest of their state is plain data
#: kept in the envelope under the same key).
SHARDED_KEYS: Final = frozenset({"model", "optimizer"})
ENVELOPE_FILE: Final = "nnhandler.pth"
MANIFEST_FILE: Final = "manifest.json"
MANIFEST_FORMAT: Final = "nnhandler.sharded"
MANIFEST_VERSION: Final = 1

Envelope = Callable[[], tuple[dict[str, Any], dict[str, Any]]]


@dataclass(frozen=True)
class ShardedCheckpoint(Checkpoint):
    """A sharded checkpoint as read from disk: ``path`` is its directory, ``state`` the
    envelope's states (the model's and optimizer's tensors stay in the DCP files until
    :func:`load_sharded_state`), ``manifest`` the checked manifest."""

    manifest: dict[str, Any] = field(default_factory=dict)
    #: the local folder DCP reads the files from (``None``: where the manifest says, under
    #: ``path``); for a checkpoint in object storage a staging folder that ``fetch`` fills
    shards: Path | None = None
    #: downloads and checks the named files into ``shards`` before DCP reads them (a
    #: checkpoint in object storage); ``None``: the files are there already
    fetch: Callable[[Iterable[str]], None] | None = None

    @property
    def files(self) -> list[str]:
        return sorted(self.manifest["files"])

    @property
    def shards_directory(self) -> Path:
        """The local folder holding (or, with :attr:`fetch`, receiving) the listed files."""
        return self.shards if self.shards is not None else files_directory(self.path,
                                                                           self.manifest)


def sharded_name(file_name: str) -> str:
    """A rendered auto-save file name (``….pth``) as a sharded checkpoint name (``….dcp``)."""
    stem = file_name.removesuffix(".pth")
    return stem if stem.endswith(SHARDED_SUFFIX) else stem + SHARDED_SUFFIX


# -- writing -----------------------------------------------------------------------------------
def write_sharded_checkpoint(path: Path, context: DistributedContext,
                             components: ShardedComponents, envelope: Envelope) -> int:
    """Write a sharded checkpoint directory at ``path``; every rank calls it (collective).

    ``envelope()`` runs on rank 0 only and returns ``(state, meta)`` for ``nnhandler.pth``
    without the model and optimizer. Returns the checkpoint's total size in bytes. An error on
    any rank is raised on every rank, and the temp directory is removed.
    """
    from ..distributed import run_on_rank_zero
    from .dcp_state import save_tensors, split_tensors

    _check_name(path)  # the same on every rank: no need to wait for rank 0
    tensors: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    for key, value in components.state_dict().items():
        tensors[key], plain[key] = split_tensors(value, f"state[{key!r}]")
    temp = Path(run_on_rank_zero(context, lambda: str(_prepare(path))))
    try:
        save_tensors(temp, tensors, context.enabled, name=path)
        names = run_on_rank_zero(context, lambda: sorted(os.listdir(temp)))
        checksums = _checksums(temp, names, context)
        return run_on_rank_zero(
            context, lambda: _commit(path, temp, checksums, plain, envelope, context.world_size))
    except BaseException:
        if context.is_main:
            with contextlib.suppress(OSError):
                remove_checkpoint_path(temp)
        raise


def _check_name(path: Path) -> None:
    if path.suffix != SHARDED_SUFFIX:
        raise ConfigurationError(
            f"{str(path)!r}: this model holds DTensor parameters, so its checkpoint is a "
            f"directory written through torch.distributed.checkpoint; give it a name ending "
            f"in {SHARDED_SUFFIX!r}"
        )


def _prepare(path: Path) -> Path:
    if os.path.lexists(path) and not _is_sharded_directory(path):
        raise ConfigurationError(
            f"{str(path)!r} exists and is not an nnhandler sharded checkpoint; refusing to "
            "replace it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(path)
    temp.mkdir()
    return temp


def _is_sharded_directory(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and (path / MANIFEST_FILE).is_file()


def _checksums(directory: Path, names: Sequence[str],
               context: DistributedContext | None) -> dict[str, tuple[int, int] | str]:
    """``(size, CRC-32)`` of each file, or why it could not be read; the ranks share the work
    (rank ``r`` reads every ``world_size``-th file) and every rank gets every result.
    ``context=None``: this process alone reads every file."""
    mine: dict[str, tuple[int, int] | str] = {}
    for index, name in enumerate(names):
        if context is not None and index % context.world_size != context.rank:
            continue
        try:
            mine[name] = file_crc32(directory / name)
        except OSError as error:
            mine[name] = f"{type(error).__name__}: {error.strerror or error}"
    if context is None:
        return mine
    from ..distributed import all_gather_objects

    merged: dict[str, tuple[int, int] | str] = {}
    for part in all_gather_objects(context, mine):
        merged.update(part)
    return merged


def _commit(path: Path, temp: Path, checksums: Mapping[str, tuple[int, int] | str],
            plain: dict[str, Any], envelope: Envelope, world_size: int) -> int:
    unreadable = {name: value for name, value in checksums.items() if isinstance(value, str)}
    if unreadable:
        raise CheckpointError(f"cannot read back the shards written to {str(temp)!r}: "
                              f"{unreadable}")
    state, meta = envelope()
    clash = sorted(set(state) & set(plain))
    if clash:
        raise CheckpointError(f"state key(s) {clash} are written through DCP and the envelope")
    from .envelope import write_checkpoint

    write_checkpoint(temp / ENVELOPE_FILE, {**state, **plain}, meta)
    files = {name: value for name, value in checksums.items() if not isinstance(value, str)}
    files[ENVELOPE_FILE] = file_crc32(temp / ENVELOPE_FILE)
    manifest = manifest_bytes(files, meta, world_size)

    def write_manifest(file: BinaryIO) -> None:
        file.write(manifest)

    atomic_write(temp / MANIFEST_FILE, write_manifest)
    fsync_directory(temp)
    _install(temp, path)
    return sum(size for size, _ in files.values()) + len(manifest)


def manifest_bytes(files: Mapping[str, tuple[int, int]], meta: Mapping[str, Any],
                   world_size: int, generation: str | None = None) -> bytes:
    """The content of ``manifest.json``: ``files`` (name: ``(size, CRC-32)``), the envelope
    ``meta``'s epoch, step, time, logs and lineage, guarded by a CRC-32 of its own.
    ``generation``: the prefix under which the files lie (object storage only)."""
    body: dict[str, Any] = {
        "format": {"name": MANIFEST_FORMAT, "version": MANIFEST_VERSION},
        "epoch": meta["epoch"],
        "step": meta["step"],
        "time": meta["time"],
        "logs": meta["logs"],
        "world_size": world_size,
        "lineage": meta.get("lineage", ""),
        "algorithm": "crc32",
        "files": {name: {"size": size, "crc32": crc} for name, (size, crc) in files.items()},
    }
    if generation is not None:
        body["generation"] = generation
    text = json.dumps(body, allow_nan=True, separators=(",", ":"), sort_keys=True)
    return json.dumps({"body": text, "crc32": crc32(text.encode())}).encode()


def _install(temp: Path, final: Path) -> None:
    """Rename the complete ``temp`` directory to ``final``; an existing ``final`` is swapped out
    atomically and then removed."""
    if not os.path.lexists(final):
        os.rename(temp, final)
    elif _rename_exchange(temp, final):
        with contextlib.suppress(OSError):  # left under the temp name: stale-temp cleanup
            remove_checkpoint_path(temp)    # removes it at the next start
    else:
        # no atomic exchange here (not Linux, or the filesystem refuses it): move the old
        # directory aside under a name no cleanup touches, so a crash between these two renames
        # leaves it recoverable, then put the new one in place
        aside = final.with_name(f".{final.name}.replaced-{secrets.token_hex(4)}")
        os.rename(final, aside)
        os.rename(temp, final)
        with contextlib.suppress(OSError):
            remove_checkpoint_path(aside)
    fsync_directory(final.parent)


_AT_FDCWD: Final = -100
_RENAME_EXCHANGE: Final = 2


def _rename_exchange(first: Path, second: Path) -> bool:
    """Atomically swap two paths with Linux's ``renameat2(RENAME_EXCHANGE)``; ``False`` where
    the platform or filesystem does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is None:
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second),
                _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


# -- reading -----------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked manifest of the sharded checkpoint at ``path`` (one small file is read)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is not a sharded checkpoint directory")
    file = path / MANIFEST_FILE
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise CheckpointCorruptedError(
            f"{str(path)!r} has no {MANIFEST_FILE}: not a complete nnhandler sharded checkpoint"
        ) from None
    return parse_manifest(raw, str(path))


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """The checked body of the manifest ``raw`` of the sharded checkpoint ``where`` (a
    directory or a URL): its own CRC-32, format and version, then its schema."""
    file = f"{where}/{MANIFEST_FILE}"
    path = where
    try:
        outer = json.loads(raw)
        text, recorded = outer["body"], outer["crc32"]
        if not isinstance(text, str) or crc32(text.encode()) != recorded:
            raise CheckpointCorruptedError(f"{str(file)!r} is corrupted: its CRC-32 does not "
                                           "match its content")
        body = json.loads(text)
        name, version = body["format"]["name"], body["format"]["version"]
    except CheckpointCorruptedError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointCorruptedError(f"{str(file)!r} is damaged: {error}") from error
    if name != MANIFEST_FORMAT or type(version) is not int:
        raise CheckpointFormatError(f"{str(file)!r} has format {name!r:.80} version "
                                    f"{version!r:.80}, expected {MANIFEST_FORMAT!r}")
    if version > MANIFEST_VERSION:
        raise CheckpointFormatError(
            f"{str(path)!r} has sharded format version {version}, newer than version "
            f"{MANIFEST_VERSION} that this nnhandler reads; upgrade nnhandler to load it"
        )
    checked = validate(ManifestBody, body, where="manifest", path=file)
    if ENVELOPE_FILE not in checked.files:
        raise CheckpointCorruptedError(f"{str(file)!r} does not list {ENVELOPE_FILE}")
    return dict(body)


def _shard_name(name: str) -> str:
    """A file of the directory: a plain name, never a path, ``.`` or ``..``."""
    if name in (".", "..") or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,200}", name):
        raise ValueError(f"{name!r} is not a plain file name inside the checkpoint directory")
    return name


class ManifestFile(Schema):
    size: Annotated[int, Field(ge=0)]
    crc32: Annotated[int, Field(ge=0, lt=2**32)]


class ManifestFormat(Schema):
    name: str
    version: int


class ManifestBody(Schema):
    """What a sharded checkpoint's ``manifest.json`` body may hold. File names are plain names
    inside the directory (no separators, no ``..``): verification reads only those."""

    format: ManifestFormat
    epoch: Annotated[int, Field(ge=0)]
    step: Annotated[int, Field(ge=0)]
    time: str
    logs: dict[str, LogValue]
    world_size: Annotated[int, Field(ge=1)]
    algorithm: Literal["crc32"]
    files: dict[Annotated[str, AfterValidator(_shard_name)], ManifestFile]
    lineage: str | None = None
    #: the prefix inside the checkpoint that holds the files (written in object storage)
    generation: Annotated[str, AfterValidator(_shard_name)] | None = None


def files_directory(path: Location, body: Mapping[str, Any]) -> Location:
    """Where the files of the checkpoint ``path`` (a folder, or a prefix in object storage)
    with manifest ``body`` lie: ``path`` itself, or the generation folder the manifest
    names (a checkpoint in, or copied from, object storage)."""
    generation = body.get("generation")
    return path / generation if isinstance(generation, str) else path


def manifest_record(path: Path) -> IntegrityRecord:
    """The manifest's epoch, step, time and logs, as discovery ranks checkpoints by them."""
    body = read_manifest(path)
    return IntegrityRecord({key: body[key] for key in ("epoch", "step", "time", "logs")})


def verify_sharded(path: str | os.PathLike[str],
                   context: DistributedContext | None = None) -> dict[str, Any]:
    """Check every file of the checkpoint against the manifest; returns the manifest.

    With a distributed ``context`` this is collective: rank 0 reads the manifest, the ranks
    share the reading, and every rank raises :class:`CheckpointCorruptedError` naming each
    damaged or missing file. Without one (``None``) this process checks every file alone,
    without torch.
    """
    path = Path(path)
    body: dict[str, Any]
    if context is None:
        body = read_manifest(path)
    else:
        from ..distributed import run_on_rank_zero

        body = run_on_rank_zero(context, lambda: read_manifest(path))
    names = sorted(body["files"])
    folder = files_directory(path, body)
    checksums = _checksums(folder, names, context)
    problems = []
    for name in names:
        found = checksums[name]
        if isinstance(found, str):
            problems.append(f"{str(folder / name)!r} cannot be read ({found})")
        else:
            problem = checksum_problem(str(folder / name), found, body["files"][name])
            if problem is not None:
                problems.append(problem)
    if problems:
        raise CheckpointCorruptedError("; ".join(problems))
    return body


def checksum_problem(where: str, found: tuple[int, int],
                     expected: Mapping[str, int]) -> str | None:
    """Why a file of ``found`` ``(size, CRC-32)`` is not the one the manifest recorded as
    ``expected`` (``None`` when it is)."""
    if found == (expected["size"], expected["crc32"]):
        return None
    return (f"{where!r} is corrupted: {found[0]} bytes with CRC-32 {found[1]:08x}, the "
            f"manifest recorded {expected['size']} bytes with {expected['crc32']:08x}")


def read_sharded_checkpoint(path: str | os.PathLike[str], map_location: Any = None, *,
                            verify: bool = True,
                            context: DistributedContext | None = None) -> ShardedCheckpoint:
    """Read a sharded checkpoint's manifest and envelope (collective with a distributed
    ``context``). With ``verify`` (the default) every file is first checked against the
    manifest. The model and optimizer tensors are read by :func:`load_sharded_state`."""
    from ..distributed import DistributedContext, run_on_rank_zero
    from .envelope import read_checkpoint

    path = Path(path)
    context = context or DistributedContext.single()
    body = (verify_sharded(path, context) if verify
            else run_on_rank_zero(context, lambda: read_manifest(path)))
    envelope = read_checkpoint(files_directory(path, body) / ENVELOPE_FILE, map_location,
                               verify=False)
    return ShardedCheckpoint(path=path, format_version=envelope.format_version,
                             meta=envelope.meta, state=envelope.state, manifest=body)


def read_any_checkpoint(path: str | os.PathLike[str], map_location: Any = None, *,
                        verify: bool = True,
                        context: DistributedContext | None = None,
                        storage_options: Mapping[str, Any] | None = None,
                        copied: Collection[str] = ()) -> Checkpoint:
    """A sharded checkpoint for a directory, else the single-file envelope; a URL
    (``s3://…``, with ``storage_options`` for fsspec) is read from its store and always
    verified (:mod:`.remote_checkpoints`). ``copied``: see
    :func:`~.envelope.read_checkpoint` (local files only)."""
    from .envelope import read_checkpoint
    from .storage import URL, location_of, store_for

    location = location_of(path)
    if isinstance(location, URL) and location.suffix == SHARDED_SUFFIX:
        from .remote_sharded import read_remote_sharded

        return read_remote_sharded(location, map_location, context=context,
                                   storage_options=storage_options)
    if isinstance(location, URL):
        from .remote_checkpoints import read_remote_checkpoint

        return read_remote_checkpoint(location, map_location, storage_options=storage_options)
    if storage_options:
        store_for(location, storage_options)  # the error naming the misplaced options
    if location.is_dir():
        return read_sharded_checkpoint(location, map_location, verify=verify, context=context)
    return read_checkpoint(location, map_location, verify=verify, copied=copied)


def load_sharded_state(checkpoint: ShardedCheckpoint, components: ShardedComponents,
                       context: DistributedContext) -> None:
    """Load the model's (and optimizer's) tensors of ``checkpoint`` into ``components``
    (collective), resharding to the current layout where it differs from the saved one."""
    from .dcp_state import load_tensors, merge_tensors, split_tensors

    target = components.load_target(checkpoint.state)
    tensors = {key: split_tensors(value)[0] for key, value in target.items()}
    load_tensors(checkpoint.shards_directory, tensors, context.enabled,
                 files=checkpoint.files, strict=components.strict, fetch=checkpoint.fetch)
    state = {key: merge_tensors(tensors[key], checkpoint.state.get(key, {})) for key in tensors}
    try:
        components.load_state_dict(state, checkpoint.state)
    except Exception as error:
        raise CheckpointError(f"the sharded state of {str(checkpoint.path)!r} does not fit this "
                              f"model/optimizer: {error}") from error


def describe_sharded(checkpoint: ShardedCheckpoint) -> dict[str, dict[str, int]]:
    """Tensor count and bytes per DCP key (``model``, ``optimizer``), from the DCP metadata."""
    from .dcp_state import describe_tensors

    return describe_tensors(checkpoint.shards_directory, checkpoint.files)


def checkpoint_size(path: Path) -> int:
    """Bytes of a checkpoint file, or of every file in a sharded checkpoint directory."""
    if path.is_dir():
        return sum(entry.stat().st_size for entry in path.iterdir() if entry.is_file())
    return path.stat().st_size
