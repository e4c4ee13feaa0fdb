"""Worker for tests/test_retention_distributed.py, launched under torchrun (2 ranks, gloo, CPU).

    python -m torch.distributed.run --nproc_per_node=2 tests/retention_ddp_worker.py SCENARIO DIR

Scenarios (each writes ``result_rank<r>.json`` into DIR):

* ``train`` — DDP: a ``keep_last=2, keep_every=3`` auto-save and an asynchronous
  ``keep_best=1`` one in the same folder train 5 epochs; then both ranks resume from the
  epoch-3 checkpoint (a crash simulated) and train to epoch 7. Records which rank wrote the
  index and removed files (and in which thread), and every rank's retention bookkeeping.
* ``sharded`` — FSDP2: ``keep_last=1, keep_every=2`` on sharded (``.dcp``) checkpoints for 3
  epochs, then rank 0 lists the folder as ``nnhandler list`` does.

A watchdog dumps every thread's stack and exits if a scenario hangs.
"""

from __future__ import annotations

import faulthandler
import json
import os
import threading
from pathlib import Path
from typing import Any

faulthandler.dump_traceback_later(150, exit=True)  # inside the test's limit

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from dist_testing import history_of, run_worker  # noqa: E402
from nnh_testing import TinyNet, mae, regression_dataset  # noqa: E402
from torch import nn  # noqa: E402

import nnhandler.checkpoint.index as index_module  # noqa: E402
import nnhandler.checkpoint.removal as removal_module  # noqa: E402
from nnhandler import AutoSaveCallback, NNHandler  # noqa: E402
from nnhandler.checkpoint.index import INDEX_FILE  # noqa: E402
from nnhandler.checkpoint.sharded import checkpoint_size  # noqa: E402
from nnhandler.cli import list_directory  # noqa: E402

RANK = int(os.environ["RANK"])
WORLD_SIZE = int(os.environ["WORLD_SIZE"])
SEED = 7

# -- who writes the index and who removes files ------------------------------------------------
INDEX_WRITES: list[dict[str, Any]] = []
REMOVALS: list[dict[str, Any]] = []
_atomic_write = index_module.atomic_write
_remove = removal_module.remove_checkpoint_path


def _recording_atomic_write(path: Path, *args: Any, **kwargs: Any) -> int:
    if path.name == INDEX_FILE:
        INDEX_WRITES.append({"rank": RANK, "thread": threading.current_thread().name})
    return _atomic_write(path, *args, **kwargs)


def _recording_remove(path: Path) -> None:
    REMOVALS.append({"rank": RANK, "name": path.name,
                     "thread": threading.current_thread().name})
    _remove(path)


index_module.atomic_write = _recording_atomic_write  # type: ignore[assignment]
removal_module.remove_checkpoint_path = _recording_remove  # type: ignore[assignment]


def attach_loaders(handler: NNHandler) -> None:
    handler.set_train_loader(regression_dataset(48), batch_size=8, shuffle=True)
    handler.set_val_loader(regression_dataset(24, seed=1), batch_size=8)


def new_handler(**arguments: Any) -> NNHandler:
    torch.manual_seed(0)
    handler = NNHandler(TinyNet, device="cpu", logger_mode=NNHandler.LoggingMode.FILE,
                        log_file=f"nnhandler_rank{RANK}.log", **arguments)
    handler.set_optimizer(torch.optim.Adam, lr=1e-2)
    handler.set_loss_fn(nn.MSELoss)
    handler.add_metric("mae", mae)
    attach_loaders(handler)
    return handler


def bookkeeping(handler: NNHandler) -> dict[str, Any]:
    """Every auto-saver's lineage and kept files with their reasons (this rank's view)."""
    return {callback.state_key: {
                "lineage": callback.retention.state.lineage,
                "files": [[entry.name, list(entry.reasons)]
                          for entry in callback.retention.state.files]}
            for callback in handler.callbacks if isinstance(callback, AutoSaveCallback)}


def scenario_train(workdir: Path) -> dict[str, Any]:
    handler = new_handler()
    handler.auto_save(1, "ck", name="ep{epoch:03d}", keep_last=2, keep_every=3)
    handler.add_callback(AutoSaveCallback(1, "ck", name="best_ep{epoch:03d}", keep_best=1,
                                          monitor="val_loss", async_save=True))
    handler.train(5, seed=SEED, progress_bar=False)
    dist.barrier()
    result: dict[str, Any] = {"first": {"files": sorted(os.listdir(workdir / "ck")),
                                        "bookkeeping": bookkeeping(handler),
                                        "history": history_of(handler)}}
    dist.barrier()
    resumed = NNHandler.load("ck/ep003.pth", logger_mode=NNHandler.LoggingMode.FILE,
                             log_file=f"nnhandler_rank{RANK}.log")
    attach_loaders(resumed)
    resumed.train(until_epoch=7, seed=SEED, progress_bar=False)
    dist.barrier()
    result["resumed"] = {"files": sorted(os.listdir(workdir / "ck")),
                         "bookkeeping": bookkeeping(resumed),
                         "history": history_of(resumed)}
    result["index_writes"] = INDEX_WRITES
    result["removals"] = REMOVALS
    if RANK == 0:
        result["index"] = json.loads((workdir / "ck" / INDEX_FILE).read_text())
    return result


def scenario_sharded(workdir: Path) -> dict[str, Any]:
    handler = new_handler(parallelism="fsdp", fsdp_units=[nn.Linear])
    handler.auto_save(1, "ck", name="ep{epoch:03d}", keep_last=1, keep_every=2)
    handler.train(3, seed=SEED, progress_bar=False)
    dist.barrier()
    result: dict[str, Any] = {"sharded": handler.sharded_checkpoints,
                              "files": sorted(os.listdir(workdir / "ck")),
                              "bookkeeping": bookkeeping(handler),
                              "index_writes": INDEX_WRITES, "removals": REMOVALS}
    if RANK == 0:
        result["listing"] = list_directory(workdir / "ck")
        result["sizes"] = {name: checkpoint_size(workdir / "ck" / name)
                           for name in result["files"] if name.endswith(".dcp")}
    dist.barrier()
    return result


def main() -> None:
    run_worker({
        "train": lambda workdir, _: scenario_train(workdir),
        "sharded": lambda workdir, _: scenario_sharded(workdir),
    }, RANK, WORLD_SIZE)


if __name__ == "__main__":
    main()
