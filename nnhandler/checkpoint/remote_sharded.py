"""Sharded (``.dcp``) checkpoints in object storage (``s3://…/NAME.dcp``, ``memory://…``).

Layout of ``NAME.dcp/`` in a store::

    manifest.json          as in a local directory (:mod:`.sharded`), plus ``generation``;
                           the checkpoint's commit marker, put LAST, by rank 0 alone
    g-<16 hex>/.metadata   DCP's index (rank 0)
    g-<16 hex>/__<r>_<n>.distcp   rank ``r``'s shards
    g-<16 hex>/nnhandler.pth      the envelope (rank 0)

**Writing** (:func:`write_remote_sharded`, collective). Rank 0 checks the target and draws a
fresh generation; every rank writes its shards through DCP's ``FileSystemWriter`` into a local
staging folder of its own (``NNHANDLER_STAGING_DIR``), then uploads each of its files under
the generation prefix, one ``put_file`` per file through :meth:`~.remote.FsspecStore.call`
(deadline, bounded retries), with the size and CRC-32 of the bytes it uploaded. The ranks
then agree (an all-gather of every rank's outcome): when any rank failed, every rank raises
(the failing one its own error, the others a :class:`~nnhandler.RemoteStorageError` naming
it), nothing is published and rank 0 removes the new generation. Only when every rank
succeeded does rank 0 upload the envelope and then put ``manifest.json``: one PUT, the moment
the checkpoint appears. An existing checkpoint of that name stays complete and loadable until
that PUT replaces its manifest; its generation is removed only afterwards (with any
generations that interrupted saves of the name left behind). A prefix without a manifest is
never a checkpoint: readers skip it, ``nnhandler list`` shows it as incomplete, an auto-saver
names it in a warning when ``train`` starts and its next save of that name removes it.

**Why staging and upload rather than DCP's ``FsspecWriter``**: every request goes through
the deadline and retry wrapper, so an endpoint that stops answering fails every rank within
``(retries + 1) x timeout`` instead of holding DCP's collective (``FsspecWriter`` calls fsspec
from inside DCP's write with no deadline of ours, and DCP's finish writes ``.metadata`` with a
rename that object stores emulate by copy); the files' CRC-32s come from the same local
read-back as for a local directory; and the costs measured on moto's S3 server were within
noise of each other (docs page "Object storage"). The price is local disk for one rank's
shards.

**Reading** (:func:`read_remote_sharded`, collective): rank 0 reads and checks the manifest,
every rank takes it; each rank downloads the envelope and ``.metadata`` and, inside DCP's
read, only the shard files its own read plan needs, each checked against the manifest's size
and CRC-32 before DCP opens it (a damaged file is a :class:`~nnhandler.CheckpointCorruptedError`
on every rank). ``load_latest`` and ``nnhandler list --verify`` / ``verify`` check a complete
copy (:func:`sharded_copy`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ..errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointFormatError,
    ConfigurationError,
    RemoteStorageError,
)
from .integrity import IntegrityRecord, file_crc32
from .remote import FsspecStore, staging_directory
from .sharded import (
    ENVELOPE_FILE,
    MANIFEST_FILE,
    SHARDED_SUFFIX,
    ShardedCheckpoint,
    checksum_problem,
    files_directory,
    manifest_bytes,
    parse_manifest,
)
from .storage import URL, Store, store_for

if TYPE_CHECKING:
    from ..distributed import DistributedContext
    from .dcp_state import ShardedComponents

__all__ = [
    "GENERATION_PATTERN",
    "ShardFetcher",
    "is_leftover",
    "read_remote_sharded",
    "remote_lineage",
    "remote_manifest",
    "remote_manifest_record",
    "remove_remote_sharded",
    "sharded_copy",
    "write_remote_sharded",
]

_LOGGER: Final = logging.getLogger("nnhandler")
#: the name of a generation prefix inside ``NAME.dcp/``
GENERATION_PATTERN: Final = re.compile(r"g-[0-9a-f]{16}")
#: set on an error of the manifest's PUT, after which the new generation may be live
_PUBLICATION_UNCERTAIN: Final = "nnhandler_publication_uncertain"

Result = TypeVar("Result")
Envelope = Callable[[], tuple[dict[str, Any], dict[str, Any]]]


def _fsspec_store(url: URL, storage_options: Mapping[str, Any] | None) -> FsspecStore:
    store = store_for(url, storage_options)
    assert isinstance(store, FsspecStore)
    return store


def _staging(url: URL, role: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{url.name}.{role}-", dir=staging_directory()))


# -- the manifest -------------------------------------------------------------------------------
def _manifest_bytes_at(store: Store, url: URL) -> bytes:
    """The raw ``manifest.json`` of ``url`` (one small GET); its absence is an error."""
    raw = store.get_bytes(url / MANIFEST_FILE)
    if raw is None:
        raise CheckpointCorruptedError(
            f"{str(url)!r} has no {MANIFEST_FILE}: not a complete nnhandler sharded checkpoint "
            "(an interrupted save leaves its files without one)")
    return raw


def remote_manifest(store: Store, url: URL) -> dict[str, Any]:
    """The checked manifest of the sharded checkpoint ``url`` (one small GET)."""
    return parse_manifest(_manifest_bytes_at(store, url), str(url))


def remote_manifest_record(store: Store, url: URL) -> IntegrityRecord:
    """The manifest's epoch, step, time and logs (as discovery ranks checkpoints by them)
    and ``size``: the bytes of every file it lists."""
    body = remote_manifest(store, url)
    record = IntegrityRecord({key: body[key] for key in ("epoch", "step", "time", "logs")})
    record["size"] = sum(int(entry["size"]) for entry in body["files"].values())
    return record


def remote_lineage(store: Store, url: URL) -> str | None:
    """The lineage the manifest of ``url`` records (``None``: none, or no valid manifest)."""
    try:
        value = remote_manifest(store, url).get("lineage")
    except (CheckpointError, OSError):
        return None
    return value if isinstance(value, str) and value else None


def is_leftover(store: Store, url: URL) -> bool:
    """Whether ``url`` is what an interrupted save left: a prefix without a manifest that
    holds generation folders and nothing else."""
    entries = store.entries(url)
    return bool(entries) and all(
        entry.is_dir and GENERATION_PATTERN.fullmatch(entry.location.name)
        for entry in entries)


# -- agreement ---------------------------------------------------------------------------------
_FAMILIES: Final[dict[str, type[Exception]]] = {
    "corrupted": CheckpointCorruptedError, "remote": RemoteStorageError}


def _family(error: BaseException) -> str:
    if isinstance(error, CheckpointCorruptedError):
        return "corrupted"
    if isinstance(error, OSError):
        return "remote"
    return "checkpoint"


def _on_every_rank(context: DistributedContext, action: Callable[[], Result],
                   what: str) -> Result:
    """``action()`` on every rank, then every rank learns every outcome: when it failed
    anywhere, each rank raises (the failing one its own error, the others an error of its
    kind naming the rank), so that no rank goes on into a collective the others left."""
    from ..distributed import all_gather_objects

    own: Exception | None = None
    result: Any = None
    try:
        result = action()
        outcome: tuple[str, str] | None = None
    except Exception as error:
        own, outcome = error, (_family(error), f"{type(error).__name__}: {error}")
    failures = [(rank, found) for rank, found in enumerate(all_gather_objects(context, outcome))
                if found is not None]
    if own is not None:
        raise own
    if failures:
        details = "; ".join(f"rank {rank}: {text}" for rank, (_, text) in failures)
        kind = _FAMILIES.get(failures[0][1][0], CheckpointError)
        raise kind(f"{what} failed on another rank: {details}")
    return result  # type: ignore[no-any-return]


# -- writing -----------------------------------------------------------------------------------
def write_remote_sharded(url: URL, context: DistributedContext, components: ShardedComponents,
                         envelope: Envelope,
                         storage_options: Mapping[str, Any] | None = None) -> int:
    """Write a sharded checkpoint to ``url`` (collective; see the module docstring).

    ``envelope()`` runs on rank 0 only (see :func:`~.sharded.write_sharded_checkpoint`).
    Returns the checkpoint's size in bytes. An error on any rank is raised on every rank and
    nothing is published under ``url``."""
    from ..distributed import run_on_rank_zero
    from .dcp_state import save_tensors, split_tensors

    if url.suffix != SHARDED_SUFFIX:
        raise ConfigurationError(
            f"{str(url)!r}: this model holds DTensor parameters, so its checkpoint is a "
            f"directory written through torch.distributed.checkpoint; give it a name ending "
            f"in {SHARDED_SUFFIX!r}")
    store = _fsspec_store(url, storage_options)  # every rank: each uploads its own files
    tensors: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    for key, value in components.state_dict().items():
        tensors[key], plain[key] = split_tensors(value, f"state[{key!r}]")
    generation = run_on_rank_zero(context, lambda: _prepare(store, url))
    prefix = url / generation
    staging = _staging(url, f"rank{context.rank}")
    try:
        save_tensors(staging, tensors, context.enabled, name=url)
        uploaded = _on_every_rank(context, lambda: _upload_folder(store, prefix, staging),
                                  f"uploading the shards of {str(url)!r}")
        from ..distributed import all_gather_objects

        files: dict[str, tuple[int, int]] = {}
        for part in all_gather_objects(context, uploaded):
            files.update(part)
        return run_on_rank_zero(context, lambda: _commit(
            store, url, generation, staging, files, plain, envelope, context.world_size))
    except BaseException as error:
        if context.is_main and not getattr(error, _PUBLICATION_UNCERTAIN, False):
            try:
                store.remove(prefix)  # the new generation only: the old one is untouched
            except OSError as error:
                _LOGGER.warning("could not remove the files of the failed save %s: %s",
                                prefix, error)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _prepare(store: FsspecStore, url: URL) -> str:
    """Rank 0: refuse a target that is not (or was not meant to be) a sharded checkpoint of
    ours; a fresh generation name."""
    if store.exists(url) and not store.is_dir(url):
        raise ConfigurationError(f"{str(url)!r} exists and is an object, not an nnhandler "
                                 "sharded checkpoint; refusing to replace it")
    entries = store.entries(url)
    if entries and not any(entry.location.name == MANIFEST_FILE for entry in entries) \
            and not is_leftover(store, url):
        raise ConfigurationError(f"{str(url)!r} exists and is not an nnhandler sharded "
                                 "checkpoint; refusing to replace it")
    return f"g-{secrets.token_hex(8)}"


def _upload_file(store: FsspecStore, target: URL, local: Path) -> tuple[int, int]:
    """Upload ``local`` whole to ``target``; its ``(size, CRC-32)``."""
    checksum = file_crc32(local)
    store.call("upload to", target, functools.partial(store.fs.put_file, str(local), target.key),
               store.settings.transfer_deadline(checksum[0]))
    return checksum


def _upload_folder(store: FsspecStore, prefix: URL, folder: Path) -> dict[str, tuple[int, int]]:
    return {name: _upload_file(store, prefix / name, folder / name)
            for name in sorted(os.listdir(folder))}


def _commit(store: FsspecStore, url: URL, generation: str, staging: Path,
            files: dict[str, tuple[int, int]], plain: dict[str, Any], envelope: Envelope,
            world_size: int) -> int:
    """Rank 0, once every rank's files are uploaded: the envelope, then the manifest (the
    publication), then the previous generation retired."""
    state, meta = envelope()
    clash = sorted(set(state) & set(plain))
    if clash:
        raise CheckpointError(f"state key(s) {clash} are written through DCP and the envelope")
    from .envelope import write_checkpoint

    write_checkpoint(staging / ENVELOPE_FILE, {**state, **plain}, meta)
    files[ENVELOPE_FILE] = _upload_file(store, url / generation / ENVELOPE_FILE,
                                        staging / ENVELOPE_FILE)
    manifest = manifest_bytes(files, meta, world_size, generation)
    try:
        store.put_bytes(url / MANIFEST_FILE, manifest)
    except BaseException as error:
        # The PUT may have landed although this side saw it fail (a timeout after the store
        # took it): the live manifest may name this generation, so none of it is removed;
        # the next save of the name retires whichever generation the manifest does not name.
        setattr(error, _PUBLICATION_UNCERTAIN, True)
        raise
    _retire(store, url, generation)
    return sum(size for size, _ in files.values()) + len(manifest)


def _retire(store: Store, url: URL, current: str) -> None:
    """Remove the generations of ``url`` other than ``current`` (the one its manifest now
    names): the replaced checkpoint's, and those of interrupted saves. A failure is a
    warning: what stays is never loaded."""
    try:
        entries = store.entries(url)
    except OSError as error:
        _LOGGER.warning("could not list %s to remove its replaced files: %s", url, error)
        return
    for entry in entries:
        name = entry.location.name
        if entry.is_dir and name != current and GENERATION_PATTERN.fullmatch(name):
            try:
                store.remove(entry.location)
            except OSError as error:
                _LOGGER.warning("could not remove the replaced files %s: %s",
                                entry.location, error)


def remove_remote_sharded(store: Store, url: URL) -> None:
    """Remove the sharded checkpoint ``url``: its manifest first (from then on it is no
    checkpoint, whatever happens to the rest), then everything under it."""
    store.remove(url / MANIFEST_FILE)
    store.remove(url)


# -- reading -----------------------------------------------------------------------------------
class ShardFetcher:
    """Downloads files of a sharded checkpoint into a local folder, each checked against the
    manifest's size and CRC-32 (a :class:`~nnhandler.CheckpointCorruptedError` naming the
    object otherwise); each file once."""

    def __init__(self, store: FsspecStore, prefix: URL, files: Mapping[str, Mapping[str, int]],
                 folder: Path) -> None:
        self.store, self.prefix, self.files, self.folder = store, prefix, files, folder
        self._fetched: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, names: Iterable[str]) -> None:
        with self._lock:
            for name in sorted(set(names) - self._fetched):
                self._fetch(name)
                self._fetched.add(name)

    def _fetch(self, name: str) -> None:
        expected = self.files.get(name)
        if expected is None:
            raise CheckpointFormatError(
                f"{str(self.prefix)!r}: {name!r} is not a file its manifest lists")
        target, local = self.prefix / name, self.folder / name
        store = self.store
        try:
            store.call("download of", target,
                       functools.partial(store.fs.get_file, target.key, str(local)),
                       store.settings.transfer_deadline(int(expected["size"])))
        except FileNotFoundError:
            raise CheckpointCorruptedError(
                f"{str(target)!r} is missing: the manifest lists it") from None
        problem = checksum_problem(str(target), file_crc32(local), expected)
        if problem is not None:
            raise CheckpointCorruptedError(problem)


def read_remote_sharded(url: URL, map_location: Any = None, *,
                        context: DistributedContext | None = None,
                        storage_options: Mapping[str, Any] | None = None) -> ShardedCheckpoint:
    """Read the sharded checkpoint at ``url`` (collective with a distributed ``context``):
    its manifest and envelope, checked; the shards are fetched by DCP's read, each rank its
    own (see the module docstring). The local staging copy goes when the returned checkpoint
    does."""
    from ..distributed import DistributedContext, run_on_rank_zero
    from .envelope import read_checkpoint
    from .remote_checkpoints import named_as

    context = context or DistributedContext.single()
    store = _fsspec_store(url, storage_options)
    body = run_on_rank_zero(context, lambda: remote_manifest(store, url))
    staging = _staging(url, f"read-rank{context.rank}")
    fetch = ShardFetcher(store, files_directory(url, body), body["files"], staging)

    def read_envelope() -> Any:
        fetch([ENVELOPE_FILE, *(name for name in body["files"] if name == ".metadata")])
        with named_as(url, staging / ENVELOPE_FILE):
            return read_checkpoint(staging / ENVELOPE_FILE, map_location, verify=False)

    try:
        envelope = _on_every_rank(context, read_envelope, f"reading {str(url)!r}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    checkpoint = ShardedCheckpoint(
        path=url,  # type: ignore[arg-type]  # a URL (a str) names it in every message
        format_version=envelope.format_version, meta=envelope.meta, state=envelope.state,
        manifest=body, shards=staging, fetch=fetch)
    weakref.finalize(checkpoint, shutil.rmtree, staging, True)
    return checkpoint


def complete_copy(store: Store, url: URL) -> contextlib.AbstractContextManager[Path]:
    """A complete local copy of the checkpoint at ``url``: a sharded one file by file
    (:func:`sharded_copy`), any other the object itself (``store.fetch``)."""
    return sharded_copy(store, url) if url.suffix == SHARDED_SUFFIX else store.fetch(url)


@contextlib.contextmanager
def sharded_copy(store: Store, url: URL) -> Iterator[Path]:
    """A complete local copy of the sharded checkpoint ``url`` (its manifest and every file
    it lists, each checked while fetched), laid out as :mod:`.sharded` reads it."""
    assert isinstance(store, FsspecStore)
    raw = _manifest_bytes_at(store, url)
    body = parse_manifest(raw, str(url))
    holder = _staging(url, "copy")
    try:
        root = holder / url.name
        root.mkdir()
        (root / MANIFEST_FILE).write_bytes(raw)
        folder = files_directory(root, body)
        folder.mkdir(exist_ok=True)
        ShardFetcher(store, files_directory(url, body), body["files"], folder)(body["files"])
        yield root
    finally:
        shutil.rmtree(holder, ignore_errors=True)
