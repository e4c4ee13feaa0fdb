"""Worker for tests/test_object_storage_distributed.py, launched under torchrun (2 ranks,
gloo, CPU): auto-saves to moto's S3 server, and a store that stops answering.

    python -m torch.distributed.run --nproc_per_node=2 tests/remote_ddp_worker.py SCENARIO DIR

``NNH_TEST_URL`` names the S3 prefix, ``NNH_SILENT_ENDPOINT`` a TCP server that never
answers; ``AWS_ENDPOINT_URL`` and credentials come from the environment. Scenarios (each
writes ``result_rank<r>.json`` into DIR):

* ``train`` — a ``keep_last=2`` auto-save (``async_save`` in a second auto-saver) to S3 for 3
  epochs, then a fresh handler continues with ``train(resume="latest")`` to epoch 4.
* ``failure`` — ``handler.save`` to the silent endpoint (timeout 1 s, 1 retry): every rank
  records when it learnt of the failure; then an auto-save whose uploads hang
  (``on_save_error="warn"``) while both ranks train on.

A watchdog dumps every thread's stack and exits if a scenario hangs.
"""

from __future__ import annotations

import faulthandler
import os
import threading
import time
from pathlib import Path
from typing import Any

faulthandler.dump_traceback_later(150, exit=True)  # inside the test's limit

import fsspec  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from dist_testing import history_of, run_worker  # noqa: E402
from fsspec.implementations.memory import MemoryFileSystem  # noqa: E402
from nnh_testing import TinyNet, mae, regression_dataset  # noqa: E402
from torch import nn  # noqa: E402

from nnhandler import AutoSaveCallback, NNHandler, RemoteStorageError  # noqa: E402

RANK = int(os.environ["RANK"])
WORLD_SIZE = int(os.environ["WORLD_SIZE"])
SEED = 7


class HangingMemoryFileSystem(MemoryFileSystem):  # type: ignore[misc]
    """``memory://`` whose uploads never finish (while ``gate`` is unset)."""

    protocol = "hangingmemory"
    cachable = False

    def __init__(self, gate: threading.Event | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = gate

    def put_file(self, lpath: str, rpath: str, **kwargs: Any) -> None:
        if self.gate is not None:
            self.gate.wait()
        super().put_file(lpath, rpath, **kwargs)


fsspec.register_implementation("hangingmemory", HangingMemoryFileSystem, clobber=True)


def new_handler() -> NNHandler:
    torch.manual_seed(0)
    handler = NNHandler(TinyNet, device="cpu", logger_mode=NNHandler.LoggingMode.FILE,
                        log_file=f"nnhandler_rank{RANK}.log")
    handler.set_optimizer(torch.optim.Adam, lr=1e-2)
    handler.set_loss_fn(nn.MSELoss)
    handler.add_metric("mae", mae)
    handler.set_train_loader(regression_dataset(48), batch_size=8, shuffle=True)
    handler.set_val_loader(regression_dataset(24, seed=1), batch_size=8)
    return handler


def listing(url: str) -> list[str]:
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url.split("://", 1)[1], detail=False))


def scenario_train(workdir: Path) -> dict[str, Any]:
    url = os.environ["NNH_TEST_URL"]
    handler = new_handler()
    handler.auto_save(1, url, name="ep{epoch:03d}", keep_last=2)
    handler.add_callback(AutoSaveCallback(1, url, name="async_ep{epoch:03d}", keep_last=1,
                                          async_save=True))
    handler.train(3, seed=SEED, progress_bar=False)
    dist.barrier()
    result: dict[str, Any] = {"first": history_of(handler),
                              "failed": [c.failed_saves for c in handler.callbacks
                                         if isinstance(c, AutoSaveCallback)]}
    if RANK == 0:
        result["files_first"] = listing(url)
    dist.barrier()
    resumed = new_handler()
    resumed.auto_save(1, url, name="ep{epoch:03d}", keep_last=2)
    resumed.train(until_epoch=4, resume="latest", seed=SEED, progress_bar=False)
    dist.barrier()
    result["resumed"] = history_of(resumed)
    if RANK == 0:
        result["files_resumed"] = listing(url)
    dist.barrier()
    return result


def scenario_failure(workdir: Path) -> dict[str, Any]:
    os.environ["NNHANDLER_REMOTE_TIMEOUT"] = "1"
    os.environ["NNHANDLER_REMOTE_RETRIES"] = "1"
    silent = os.environ["NNH_SILENT_ENDPOINT"]
    handler = new_handler()
    handler.train(1, seed=SEED, progress_bar=False)
    dist.barrier()
    started = time.monotonic()
    error = ""
    try:
        handler.save("s3://stuck/ep001.pth", storage_options={
            "endpoint_url": silent, "key": "k", "secret": "s"})
    except RemoteStorageError as failure:
        error = f"{type(failure).__name__}: {failure}"
    except Exception as failure:  # other ranks get rank 0's error as it was raised there
        error = f"{type(failure).__name__}: {failure}"
    knew_after = time.monotonic() - started
    dist.barrier()  # no rank was left behind in a collective
    gate = threading.Event()
    callback = handler.auto_save(1, f"hangingmemory://nnh-ddp-{os.getpid()}/run",
                                 storage_options={"gate": gate})
    handler.train(2, seed=SEED, progress_bar=False)
    gate.set()
    dist.barrier()
    return {"error": error, "knew_after_s": knew_after, "epoch": handler.epoch,
            "failed_saves": callback.failed_saves}


def main() -> None:
    run_worker({
        "train": lambda workdir, _: scenario_train(workdir),
        "failure": lambda workdir, _: scenario_failure(workdir),
    }, RANK, WORLD_SIZE)


if __name__ == "__main__":
    main()
