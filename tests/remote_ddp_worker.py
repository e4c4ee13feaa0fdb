"""Worker for tests/test_object_storage_distributed.py, launched under torchrun (2 ranks,
gloo, CPU): auto-saves to moto's S3 server, and a store that stops answering.

    python -m torch.distributed.run --nproc_per_node=2 tests/remote_ddp_worker.py SCENARIO DIR

``NNH_TEST_URL`` names the S3 prefix, ``NNH_TEST_TAG`` a name part unique to the test,
``NNH_SILENT_ENDPOINT`` a TCP server that never answers; ``AWS_ENDPOINT_URL`` and
credentials come from the environment. Scenarios (each writes ``result_rank<r>.json`` into
DIR):

* ``train`` — a ``keep_last=2`` auto-save (``async_save`` in a second auto-saver) to S3 for 3
  epochs, then a fresh handler continues with ``train(resume="latest")`` to epoch 4.
* ``failure`` — ``handler.save`` to the silent endpoint (timeout 1 s, 1 retry): every rank
  records when it learnt of the failure; then an auto-save whose uploads hang
  (``on_save_error="warn"``) while both ranks train on.

* ``mirror`` — a ``keep_last=2`` auto-save into a local folder with ``mirror=NNH_TEST_URL``
  for 3 epochs (rank 0 uploads each checkpoint once), then the local folder is wiped and a
  fresh handler resumes from the mirror to epoch 4.
* ``mirror_raise`` — ``on_save_error="raise"``: after one epoch the mirror's bucket is
  removed; the failed upload is raised on every rank at the next save or the end of ``train``.
* ``mirror_warn`` — ``on_save_error="warn"`` with a mirror at ``NNH_SILENT_ENDPOINT`` (timeout
  1 s, no retry): both ranks train on.

A watchdog dumps every thread's stack and exits if a scenario hangs.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

faulthandler.dump_traceback_later(150, exit=True)  # inside the test's limit

import fsspec  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from dist_testing import group_still_works, history_of, run_worker  # noqa: E402
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


def local_names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if not path.name.startswith("."))


def scenario_mirror(workdir: Path) -> dict[str, Any]:
    url = os.environ["NNH_TEST_URL"]
    local = workdir / "ck"
    handler = new_handler()
    callback = handler.auto_save(1, local, name="ep{epoch:03d}", keep_last=2, mirror=url)
    handler.train(3, seed=SEED, progress_bar=False)
    dist.barrier()
    result: dict[str, Any] = {"first": history_of(handler), "uploads": callback.mirror.uploads,
                              "failed": callback.failed_saves}
    if RANK == 0:
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        result["local_first"], result["mirror_first"] = local_names(local), listing(url)
        result["same_bytes"] = all(
            fs.cat_file(f"{url.split('://', 1)[1]}/{name}") == (local / name).read_bytes()
            for name in result["local_first"] if name.endswith(".pth"))  # the index differs
        shutil.rmtree(local)  # rank 0's disk is lost
    dist.barrier()
    resumed = new_handler()
    again = resumed.auto_save(1, local, name="ep{epoch:03d}", keep_last=2, mirror=url)
    resumed.train(until_epoch=4, resume="latest", seed=SEED, progress_bar=False)
    dist.barrier()
    result.update(resumed=history_of(resumed), uploads_resumed=again.mirror.uploads)
    if RANK == 0:
        result["local_resumed"], result["mirror_resumed"] = local_names(local), listing(url)
    dist.barrier()
    return result


def scenario_mirror_raise(workdir: Path) -> dict[str, Any]:
    bucket = f"nnh-ddp-gone-{os.environ['NNH_TEST_TAG']}"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    handler = new_handler()  # starts the process group
    if RANK == 0:
        fs.mkdir(bucket)
    dist.barrier()
    handler.auto_save(1, workdir / "ck", name="ep{epoch:03d}", on_save_error="raise",
                      mirror=f"s3://{bucket}/run")
    handler.train(1, seed=SEED, progress_bar=False)  # ep001 mirrored
    dist.barrier()
    mirrored_first = listing(f"s3://{bucket}/run") if RANK == 0 else []
    if RANK == 0:
        fs.rm(bucket, recursive=True)  # every later upload fails
    dist.barrier()
    started = time.monotonic()
    error = ""
    try:
        handler.train(2, seed=SEED, progress_bar=False)
    except Exception as failure:  # rank 1: rank 0's error as it was raised there
        error = f"{type(failure).__name__}: {failure}"
    knew_after = time.monotonic() - started
    return {"error": error, "knew_after_s": knew_after, "epoch": handler.epoch,
            "mirrored_first": mirrored_first, "still_in_step": group_still_works(),
            "local": local_names(workdir / "ck") if RANK == 0 else []}


def scenario_mirror_warn(workdir: Path) -> dict[str, Any]:
    os.environ["NNHANDLER_REMOTE_TIMEOUT"] = "1"
    os.environ["NNHANDLER_REMOTE_RETRIES"] = "0"
    handler = new_handler()
    callback = handler.auto_save(1, workdir / "ck", name="ep{epoch:03d}", keep_last=2,
                                 mirror="s3://stuck/run", storage_options={
                                     "endpoint_url": os.environ["NNH_SILENT_ENDPOINT"],
                                     "key": "k", "secret": "s"})
    started = time.monotonic()
    handler.train(3, seed=SEED, progress_bar=False)
    took = time.monotonic() - started
    dist.barrier()
    log = Path(f"nnhandler_rank{RANK}.log").read_text()
    return {"epoch": handler.epoch, "failed_saves": callback.failed_saves, "took_s": took,
            "reported": log.count("MIRROR UPLOAD FAILED"),
            "local": local_names(workdir / "ck") if RANK == 0 else [],
            "still_in_step": group_still_works()}


def main() -> None:
    run_worker({
        "train": lambda workdir, _: scenario_train(workdir),
        "failure": lambda workdir, _: scenario_failure(workdir),
        "mirror": lambda workdir, _: scenario_mirror(workdir),
        "mirror_raise": lambda workdir, _: scenario_mirror_raise(workdir),
        "mirror_warn": lambda workdir, _: scenario_mirror_warn(workdir),
    }, RANK, WORLD_SIZE)


if __name__ == "__main__":
    main()
