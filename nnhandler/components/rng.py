"""Random streams: Python, NumPy, torch CPU and CUDA — saved per rank."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import AfterValidator, Field, InstanceOf

from ..checkpoint.schema import Schema, schema_error, validate
from ..distributed import DistributedContext, all_gather_objects

__all__ = ["RNGState", "capture_rng", "restore_rng", "seed_everything"]

log = logging.getLogger("nnhandler")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and every CUDA device with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def capture_rng() -> dict[str, Any]:
    """This process's random states as checkpoint-safe data (tensors and numbers)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    legacy = np.random.get_state(legacy=True)  # the global stream is MT19937: a tuple
    assert isinstance(legacy, tuple)
    kind, keys, pos, has_gauss, cached = legacy
    state["numpy"] = {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate(
        (int(python["version"]), tuple(int(x) for x in python["state"].tolist()), python["gauss"])
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
        else:
            log.warning(
                "checkpoint holds CUDA random states for %d devices, this process sees %d; "
                "CUDA streams are not restored", len(cuda_states), torch.cuda.device_count()
            )
    numpy_state = state.get("numpy")  # absent in files saved where NumPy was not installed
    if numpy_state is not None:
        np.random.set_state((
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            int(numpy_state["pos"]),
            int(numpy_state["has_gauss"]),
            float(numpy_state["cached_gaussian"]),
        ))


def _tensor_of(dtype: torch.dtype, length: int | None = None) -> Any:
    """A pydantic type: a 1-D CPU-loadable tensor of ``dtype`` (and ``length``)."""

    def check(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype != dtype or tensor.dim() != 1:
            raise ValueError(f"expected a 1-D {dtype} tensor, got {tensor.dtype} with shape "
                             f"{tuple(tensor.shape)}")
        if length is not None and tensor.numel() != length:
            raise ValueError(f"expected {length} values, got {tensor.numel()}")
        return tensor

    return Annotated[InstanceOf[torch.Tensor], AfterValidator(check)]


class PythonRNG(Schema):
    version: int
    state: _tensor_of(torch.int64, 625)  # type: ignore[valid-type]
    gauss: float | None


class NumpyRNG(Schema):
    kind: str
    keys: _tensor_of(torch.int64, 624)  # type: ignore[valid-type]
    pos: Annotated[int, Field(ge=0, le=624)]
    has_gauss: int
    cached_gaussian: float


class RankRNG(Schema):
    python: PythonRNG
    torch: _tensor_of(torch.uint8)  # type: ignore[valid-type]
    cuda: list[_tensor_of(torch.uint8)]  # type: ignore[valid-type]
    numpy: NumpyRNG | None = None


class RNGRecord(Schema):
    """What a checkpoint's ``rng`` state may hold: one entry per saving rank."""

    world_size: Annotated[int, Field(ge=1)]
    ranks: Annotated[list[RankRNG], Field(min_length=1)]


class RNGState:
    """Every rank's random states.

    Rank 0 writes the file, so a save first brings all ranks' states to it (:meth:`gathered`);
    on load each rank takes its own back. At a different world size rank ``r`` takes the states
    of saved rank ``r % saved``: fewer ranks continue the first ones' streams, extra ranks repeat
    them (as every rank starts from the same seed in a fresh run). The handler warns that exact
    equality with an uninterrupted run cannot hold then.
    """

    state_key = "rng"

    def __init__(self, context: DistributedContext) -> None:
        self._context = context
        self._gathered: list[dict[str, Any]] | None = None

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Collective: inside this block ``state_dict()`` holds every rank's states."""
        self._gathered = all_gather_objects(self._context, capture_rng())
        try:
            yield
        finally:
            self._gathered = None

    def state_dict(self) -> dict[str, Any]:
        ranks = self._gathered if self._gathered is not None else [capture_rng()]
        return {"world_size": len(ranks), "ranks": ranks}

    @staticmethod
    def check_state(state: Any) -> None:
        record = validate(RNGRecord, state, where="")
        if record.world_size != len(record.ranks):
            raise schema_error(f"is {record.world_size}, but the state holds "
                               f"{len(record.ranks)} rank(s)", field=".world_size")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks = state["ranks"]
        restore_rng(ranks[self._context.rank % len(ranks)])
