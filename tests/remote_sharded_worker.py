"""Worker for tests/test_object_storage_sharded.py, launched under torchrun (2 ranks, gloo,
CPU): FSDP2 sharded (``.dcp``) checkpoints on moto's S3 server.

    python -m torch.distributed.run --nproc_per_node=2 tests/remote_sharded_worker.py SCENARIO DIR

``NNH_TEST_URL`` names the S3 prefix; ``AWS_ENDPOINT_URL`` and credentials come from the
environment. Scenarios (each writes ``result_rank<r>.json`` into DIR):

* ``train`` — the FSDP2 model of tests/sharded_worker.py auto-saves to S3 (every 2nd epoch,
  and ``last`` replaced every epoch) for 4 epochs; ``NNHandler.load`` of the epoch-2 prefix
  continues to epoch 4 (its restored auto-saves replacing the run's own prefixes) and must
  equal the uninterrupted run exactly; a restartable script
  continues with ``train(resume="latest")``; a save and load by hand round-trips.
* ``upload_failure`` — rank 1's store stops answering (``NNH_SILENT_ENDPOINT``; timeout 1 s,
  1 retry) during ``handler.save``: both ranks raise, each records when; nothing is
  published; the group still works and the next save succeeds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
from dist_testing import attempt, group_still_works, history_of, run_worker
from nnh_testing import mae
from sharded_worker import (
    EPOCHS,
    RANK,
    SEED,
    WORLD_SIZE,
    Recorder,
    attach_loaders,
    full_model,
    full_optimizer,
    local_shards,
    new_handler,
    same,
)

from nnhandler import AutoSaveCallback, NNHandler


def store_listing(url: str) -> list[str]:
    """Every object under ``url``, relative to it, generation folders as ``g-*`` (rank 0)."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    key = url.removeprefix("s3://")
    names = []
    for path in fs.find(key):
        parts = path[len(key) + 1:].split("/")
        names.append("/".join("g-*" if part.startswith("g-") else part for part in parts))
    return sorted(names)


def add_autosaves(handler: NNHandler, url: str) -> None:
    handler.auto_save(2, url, name="ep{epoch:03d}")
    handler.add_callback(AutoSaveCallback(1, url, name="last", overwrite=True))


def scenario_train(workdir: Path) -> dict[str, Any]:
    url = os.environ["NNH_TEST_URL"]
    handler = new_handler()
    recorder = Recorder()
    handler.add_callback(recorder)
    add_autosaves(handler, url)
    handler.train(EPOCHS, seed=SEED, progress_bar=False)
    dist.barrier()
    result: dict[str, Any] = {"sharded": handler.sharded_checkpoints,
                              "history": history_of(handler)}
    if RANK == 0:
        result["objects"] = store_listing(url)

    # exact resume from the epoch-2 prefix by NNHandler.load
    loaded = NNHandler.load(f"{url}/ep002.dcp", logger_mode=NNHandler.LoggingMode.FILE,
                            log_file=f"nnhandler_rank{RANK}.log")
    result["loaded"] = {
        "epoch": loaded.epoch, "sharded": loaded.sharded_checkpoints,
        "params_equal_epoch2": same(full_model(loaded), recorder.params[2]),
        "optimizer_equal_epoch2": same(full_optimizer(loaded), recorder.optimizer[2]),
    }
    attach_loaders(loaded)  # its auto-saves came back: they replace ep004 and last, own lineage
    loaded.add_metric("mae", mae)
    resumed = Recorder()
    loaded.add_callback(resumed)
    loaded.train(until_epoch=EPOCHS, seed=SEED, progress_bar=False)
    result["loaded"].update({
        "history": history_of(loaded),
        "params_equal": {e: same(resumed.params[e], recorder.params[e]) for e in (3, 4)},
        "optimizer_equal": {e: same(resumed.optimizer[e], recorder.optimizer[e])
                            for e in (3, 4)},
    })

    # a restartable script: train(resume="latest") on the URL continues from epoch 4
    script = new_handler()
    add_autosaves(script, url)
    script.train(until_epoch=EPOCHS + 1, resume="latest", seed=SEED, progress_bar=False)
    result["resume_latest"] = history_of(script)

    # by hand: save and load round trip of the very shards
    shards = local_shards(script)
    script.save(f"{url}/by_hand.dcp")
    again = NNHandler.load(f"{url}/by_hand.dcp", logger_mode=NNHandler.LoggingMode.FILE,
                           log_file=f"nnhandler_rank{RANK}.log")
    result["by_hand_shards_equal"] = same(local_shards(again), shards)
    dist.barrier()
    if RANK == 0:
        result["objects_after"] = store_listing(url)
    return result


def scenario_upload_failure(workdir: Path) -> dict[str, Any]:
    url = os.environ["NNH_TEST_URL"]
    os.environ["NNHANDLER_REMOTE_TIMEOUT"] = "1"
    os.environ["NNHANDLER_REMOTE_RETRIES"] = "1"
    handler = new_handler()
    handler.train(1, seed=SEED, progress_bar=False)
    # rank 1's network to the store is gone: its endpoint accepts and never answers
    options = ({"client_kwargs": {"endpoint_url": os.environ["NNH_SILENT_ENDPOINT"]}}
               if RANK == 1 else None)
    dist.barrier()
    started = time.monotonic()
    error = attempt(lambda: handler.save(f"{url}/broken.dcp", storage_options=options))
    result: dict[str, Any] = {"error": error, "knew_after_s": time.monotonic() - started}
    result["after_error"] = group_still_works()
    dist.barrier()
    if RANK == 0:
        result["objects_after_failure"] = store_listing(url)
    handler.save(f"{url}/good.dcp")
    dist.barrier()
    if RANK == 0:
        result["objects_after_good"] = store_listing(url)
    return result


def main() -> None:
    def prepare(workdir: Path) -> None:
        dist.init_process_group("gloo")

    run_worker({
        "train": lambda workdir, _: scenario_train(workdir),
        "upload_failure": lambda workdir, _: scenario_upload_failure(workdir),
    }, RANK, WORLD_SIZE, before=prepare)


if __name__ == "__main__":
    main()
