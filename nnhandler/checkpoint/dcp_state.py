"""Model and optimizer state through ``torch.distributed.checkpoint`` (DCP), safely.

``torch.distributed.checkpoint.state_dict.get_state_dict`` / ``set_state_dict`` produce and
apply the state of FSDP2, DTensor, DDP and plain models alike (parameters keyed by their
fully qualified names), so a checkpoint written at one world size or wrapping loads into another
where DCP can reshard it.

Only *tensors* go through DCP. Everything else in those states (the optimizer's
``param_groups``, non-tensor per-parameter values) is plain data that the caller keeps in the
checkpoint envelope. DCP stores non-tensor values by pickling them and reads its ``.metadata``
file with ``pickle.load``; nnhandler never executes code from a checkpoint, so the reader below
unpickles the metadata with an allow-list of DCP's own metadata classes, accepts only shard
files named in the checkpoint's manifest, and refuses pickled entries outright.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from ..errors import CheckpointCorruptedError, CheckpointError, CheckpointFormatError

__all__ = [
    "UNSTEPPED_KEY",
    "ShardedComponents",
    "describe_tensors",
    "load_tensors",
    "merge_tensors",
    "save_tensors",
    "split_tensors",
]


#: Marks an optimizer that has not stepped yet: its (tensor-free) native state is kept as is,
#: because ``get_state_dict`` would first initialise it with a zero-gradient step.
UNSTEPPED_KEY: Final = "unstepped_optimizer"


@dataclass
class ShardedComponents:
    """The model and (optionally) the optimizer whose state goes through DCP.

    ``state_dict()`` is ``{"model": ..., "optimizer": ...}`` as ``get_state_dict`` gives it:
    DTensor shards for an FSDP2 model, whole tensors for a plain one, keyed by parameter name.
    It never changes the optimizer: one that has not stepped yet is recorded with its native
    ``state_dict()`` under :data:`UNSTEPPED_KEY`. ``strict`` demands matching model keys.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer | None
    strict: bool = True

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.module)}
        if not self.optimizer.state:
            return {"model": get_model_state_dict(self.module),
                    "optimizer": {UNSTEPPED_KEY: self.optimizer.state_dict()}}
        model, optimizer = get_state_dict(self.module, self.optimizer)
        return {"model": model, "optimizer": optimizer}

    def _loads_optimizer(self, saved: Mapping[str, Any]) -> bool:
        recorded = saved.get("optimizer")
        return (self.optimizer is not None and isinstance(recorded, Mapping)
                and UNSTEPPED_KEY not in recorded)

    def load_target(self, saved: Mapping[str, Any]) -> dict[str, Any]:
        """A state of the right structure to fill from DCP, for a checkpoint whose envelope
        holds ``saved`` (the plain part of each key)."""
        if self._loads_optimizer(saved):
            assert self.optimizer is not None
            model, optimizer = get_state_dict(self.module, self.optimizer)
            return {"model": model, "optimizer": optimizer}
        return {"model": get_model_state_dict(self.module)}

    def load_state_dict(self, state: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
        """Apply ``state`` (a filled :meth:`load_target`) and what only ``saved`` holds."""
        options = StateDictOptions(strict=self.strict)
        if "optimizer" in state:
            assert self.optimizer is not None
            set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=options)
            return
        set_model_state_dict(self.module, state["model"], options=options)
        recorded = saved.get("optimizer")
        if (self.optimizer is not None and isinstance(recorded, Mapping)
                and UNSTEPPED_KEY in recorded):
            self.optimizer.load_state_dict(recorded[UNSTEPPED_KEY])


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tensor(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(item) for item in value)
    return False


def split_tensors(tree: Mapping[str, Any], where: str = "state") -> tuple[dict[str, Any],
                                                                          dict[str, Any]]:
    """``tree`` as two trees of the same nesting: its tensors (reached through dicts) and the
    rest. A dict without tensors stays whole in the rest (empty ones included); a list or tuple
    holding tensors cannot be split and is a :class:`CheckpointError` naming it."""
    tensors: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, Mapping) and _holds_tensor(value):
            tensors[key], rest = split_tensors(value, f"{where}[{key!r}]")
            if rest:
                plain[key] = rest
        elif _holds_tensor(value):
            raise CheckpointError(
                f"{where}[{key!r}] holds tensors inside a {type(value).__qualname__}; sharded "
                "checkpoints store tensors reached through dicts only"
            )
        else:
            plain[key] = value
    return tensors, plain


def merge_tensors(tensors: Mapping[str, Any], plain: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`split_tensors`."""
    merged = dict(plain)
    for key, value in tensors.items():
        merged[key] = (merge_tensors(value, plain.get(key, {})) if isinstance(value, Mapping)
                       else value)
    return merged


@contextlib.contextmanager
def _dcp_errors(what: str, directory: Path | str) -> Iterator[None]:
    """DCP raises a failure of any rank on every rank as ``CheckpointException``, which is a
    ``BaseException``; turn it into a :class:`CheckpointError` that names each rank's error
    (an interrupt stays an interrupt)."""
    try:
        yield
    except CheckpointException as error:
        failures = sorted(error.failures.items())
        for _, (raised, _trace) in failures:
            if not isinstance(raised, Exception):
                raise raised from error
        details = "; ".join(f"rank {rank}: {type(raised).__name__}: {raised}"
                            for rank, (raised, _trace) in failures)
        # a damaged file found by any rank is damage on every rank (load_latest passes it by)
        kind = (CheckpointCorruptedError
                if any(isinstance(raised, CheckpointCorruptedError) for _, (raised, _t) in failures)
                else CheckpointError)
        raise kind(f"{what} {str(directory)!r} failed: {details}") from error


@contextlib.contextmanager
def _single_process_is_meant() -> Iterator[None]:
    """DCP warns that it "assumes" a single process whenever it runs without one; nnhandler
    passes ``no_dist`` deliberately, so that warning says nothing to the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable",
                                category=UserWarning)
        yield


def save_tensors(directory: Path, tensors: dict[str, Any], distributed: bool, *,
                 name: Path | str) -> None:
    """Write ``tensors`` (each rank its own shards) into ``directory``; collective when
    ``distributed``. Files are fsynced. An error on any rank is raised on every rank as a
    :class:`CheckpointError` naming the rank, its error and the checkpoint ``name``."""
    with _dcp_errors("writing the shards of", name), _single_process_is_meant():
        dcp_save(tensors, storage_writer=FileSystemWriter(directory, sync_files=True),
                 no_dist=not distributed)


def load_tensors(directory: Path, target: dict[str, Any], distributed: bool, *,
                 files: Iterable[str], strict: bool = True,
                 fetch: Callable[[Iterable[str]], None] | None = None) -> None:
    """Fill the tensors of ``target`` in place from ``directory`` (collective when
    ``distributed``), resharding where the saved layout differs. Only ``files`` may be read.
    ``fetch(names)``: brings the files this rank's read plan needs into ``directory`` first
    (a checkpoint in object storage: each rank downloads only its part)."""
    reader = _SafeReader(directory, frozenset(files), fetch)
    reader.read_metadata()  # checked here, so a refusal is raised as itself, not inside DCP
    try:
        with _dcp_errors("loading the shards of", directory), _single_process_is_meant():
            dcp_load(target, storage_reader=reader,
                     planner=_TensorOnlyPlanner(allow_partial_load=not strict),
                     no_dist=not distributed)
    except CheckpointError:
        raise
    except Exception as error:  # missing keys, size mismatches found before any collective
        raise CheckpointError(f"cannot load the sharded state in {str(directory)!r}: "
                              f"{error}") from error


def describe_tensors(directory: Path, files: Iterable[str]) -> dict[str, dict[str, int]]:
    """``{top-level key: {"tensors": n, "bytes": b}}`` from the DCP metadata (global sizes)."""
    metadata = _SafeReader(directory, frozenset(files)).read_metadata()
    summary: dict[str, dict[str, int]] = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        key = fqn.split(".", 1)[0]
        item = summary.setdefault(key, {"tensors": 0, "bytes": 0})
        if isinstance(entry, TensorStorageMetadata):
            item["tensors"] += 1
            element = torch.empty((), dtype=entry.properties.dtype).element_size()
            item["bytes"] += entry.size.numel() * element
    return summary


# -- reading without unpickling code -----------------------------------------------------------
_DCP_METADATA: Final = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS: Final = frozenset({
    (_DCP_METADATA, name) for name in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
})


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only DCP's metadata classes, ``torch.Size`` and dtypes; anything else in the
    metadata file (a function, ``os.system`` …) is refused before it can run."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointFormatError(
            f"the DCP metadata names {module}.{name}, which is not a metadata class; "
            "nnhandler refuses to unpickle it"
        )


class _SafeReader(FileSystemReader):
    """A ``FileSystemReader`` whose metadata is unpickled by :class:`_MetadataUnpickler` and
    whose shard files must be among ``files`` (the manifest's list)."""

    def __init__(self, path: Path, files: frozenset[str],
                 fetch: Callable[[Iterable[str]], None] | None = None) -> None:
        super().__init__(path)
        self._files = files
        self._fetch = fetch
        self._checked_metadata: Metadata | None = None

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Any:
        if self._fetch is not None:
            self._fetch({self.storage_data[item.storage_index].relative_path
                         for item in plan.items})
        return super().read_data(plan, planner)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointFormatError("per-rank DCP metadata files are not supported")
        if self._checked_metadata is None:
            self._checked_metadata = self._read_checked_metadata()
        return self._checked_metadata

    def _read_checked_metadata(self) -> Metadata:
        path = Path(self._get_metadata_path())
        try:
            with open(path, "rb") as file:
                metadata = _MetadataUnpickler(io.BufferedReader(file)).load()
        except CheckpointError:
            raise
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as error:
            raise CheckpointFormatError(f"cannot read the DCP metadata {str(path)!r}: "
                                        f"{error}") from error
        if not isinstance(metadata, Metadata):
            raise CheckpointFormatError(f"{str(path)!r} does not hold DCP metadata")
        for info in (metadata.storage_data or {}).values():
            relative = getattr(info, "relative_path", None)
            if relative not in self._files:
                raise CheckpointFormatError(
                    f"the DCP metadata of {str(self.path)!r} refers to {relative!r}, which the "
                    "checkpoint's manifest does not list"
                )
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        assert metadata.storage_meta is not None
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorOnlyPlanner(DefaultLoadPlanner):
    """Loads tensors; a pickled (non-tensor) entry is refused instead of unpickled."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise CheckpointFormatError(
            f"the sharded checkpoint stores {read_item.dest_index.fqn!r} as pickled bytes; "
            "nnhandler writes only tensors there and never unpickles checkpoint data"
        )
