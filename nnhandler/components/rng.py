"""Random streams: Python, NumPy, torch CPU and CUDA — saved per rank."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..distributed import DistributedContext, all_gather_objects
from .rng_record import check_rng_state

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
        check_rng_state(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks = state["ranks"]
        restore_rng(ranks[self._context.rank % len(ranks)])
