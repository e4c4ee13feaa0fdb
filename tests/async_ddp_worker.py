"""Worker for tests/test_async_distributed.py, launched under torchrun (2 ranks, gloo, CPU).

    python -m torch.distributed.run --nproc_per_node=2 ... tests/async_ddp_worker.py SCENARIO DIR

Scenarios (each writes ``result_rank<r>.json`` into DIR):

* ``train`` — asynchronous auto-save every epoch (plus an ``overwrite=True`` one): records which
  ranks wrote and removed files, the ``on_checkpoint_saved`` events each rank saw, and what
  each rank finds on disk the moment ``train`` returns (before any barrier of its own).
* ``errors`` — rank 0's background write of epoch 2 fails with ENOSPC: with
  ``on_save_error="raise"`` both ranks raise (rank 1 a CheckpointError naming rank 0's error),
  with ``"warn"`` both ranks train on and count the failure the same way.
* ``seam`` — a third-party saver on the public checkpointing seam (``handler.checkpoints.save``
  and ``BackgroundSave``): every rank gets the same ``SavedCheckpoint`` and events, only rank 0
  writes, and a save rank 0 cannot write raises on both ranks, which stay in step.

A watchdog dumps every thread's stack and exits if a scenario hangs.
"""

from __future__ import annotations

import errno
import faulthandler
import os
import threading
import traceback
from pathlib import Path
from typing import Any

faulthandler.dump_traceback_later(75, exit=True)  # well inside the test's 120 s limit

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from dist_testing import run_worker  # noqa: E402
from nnh_testing import TinyNet, mae, regression_dataset  # noqa: E402
from torch import nn  # noqa: E402

import nnhandler.checkpoint.background as background  # noqa: E402
import nnhandler.checkpoint.writer as writer_module  # noqa: E402
import nnhandler.checkpointing as checkpointing_module  # noqa: E402
from nnhandler import (  # noqa: E402
    AutoSaveCallback,
    BackgroundSave,
    Callback,
    CheckpointError,
    NNHandler,
    SavedCheckpoint,
    Trainer,
)
from nnhandler.checkpoint.integrity import verify_file  # noqa: E402

RANK = int(os.environ["RANK"])
WORLD_SIZE = int(os.environ["WORLD_SIZE"])
EPOCHS = 3

# -- who writes and who removes checkpoints ----------------------------------------------------
WRITES: list[dict[str, Any]] = []
REMOVALS: list[dict[str, Any]] = []
_original_write = background.write_envelope
_original_unlink = os.unlink


def _recording_write(path: Path, *args: Any, **kwargs: Any) -> int:
    WRITES.append({"rank": RANK, "path": str(path),
                   "thread": threading.current_thread().name})
    return _original_write(path, *args, **kwargs)


def _recording_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
    if os.fspath(path).endswith(".pth"):
        REMOVALS.append({"rank": RANK, "path": os.fspath(path)})
    _original_unlink(path, *args, **kwargs)


_original_sync_write = checkpointing_module.write_checkpoint


def _recording_sync_write(path: Path, *args: Any, **kwargs: Any) -> int:
    WRITES.append({"rank": RANK, "path": str(path),
                   "thread": threading.current_thread().name})
    return _original_sync_write(path, *args, **kwargs)


background.write_envelope = _recording_write
checkpointing_module.write_checkpoint = _recording_sync_write
os.unlink = _recording_unlink


class SavedEvents(Callback):
    def __init__(self) -> None:
        self.events: list[list[Any]] = []

    def on_checkpoint_saved(self, path: Path, epoch: int, **kwargs: Any) -> None:
        self.events.append([str(path), epoch])


def new_handler() -> NNHandler:
    torch.manual_seed(0)
    handler = NNHandler(TinyNet, device="cpu", logger_mode=NNHandler.LoggingMode.FILE,
                        log_file=f"nnhandler_rank{RANK}.log")
    handler.set_optimizer(torch.optim.Adam, lr=1e-2)
    handler.set_loss_fn(nn.MSELoss)
    handler.add_metric("mae", mae)
    handler.set_train_loader(regression_dataset(48), batch_size=8, shuffle=True)
    return handler


def on_disk(directory: Path) -> dict[str, Any]:
    """Every file in ``directory``: its recorded epoch if it verifies, else the error."""
    found: dict[str, Any] = {}
    for path in sorted(directory.iterdir()):
        try:
            found[path.name] = verify_file(path)["epoch"]
        except Exception as error:
            found[path.name] = f"{type(error).__name__}: {error}"
    return found


def scenario_train(workdir: Path) -> dict[str, Any]:
    handler = new_handler()
    events = SavedEvents()
    handler.add_callback(events)
    handler.auto_save(1, "ck", name="ep{epoch:03d}", async_save=True)
    handler.add_callback(AutoSaveCallback(1, "ck", name="latest_ep{epoch:03d}", overwrite=True,
                                          async_save=True))
    handler.train(EPOCHS, seed=7, progress_bar=False)
    seen_at_return = on_disk(workdir / "ck")  # no barrier of ours: train's own flush must do
    threads = [t.name for t in threading.enumerate() if t.name.startswith("nnhandler")]
    dist.barrier()
    return {"writes": WRITES, "removals": REMOVALS, "events": events.events,
            "on_disk_at_return": seen_at_return, "writer_threads_left": threads,
            "weights": {k: v.tolist() for k, v in handler.module.state_dict().items()}}


def fail_second_open_on_rank_zero() -> None:
    opens = [0]
    real_open = open

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        opens[0] += 1
        if RANK == 0 and opens[0] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(file))
        return real_open(file, mode, *args, **kwargs)

    writer_module.open = fake_open  # type: ignore[attr-defined]


def error_record(error: BaseException) -> dict[str, Any]:
    return {"type": type(error).__name__, "is_checkpoint_error": isinstance(error, CheckpointError),
            "message": str(error), "traceback": traceback.format_exc()}


def scenario_errors(workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for policy in ("raise", "warn"):
        fail_second_open_on_rank_zero()
        handler = new_handler()
        callback = handler.auto_save(1, policy, name="ep{epoch:03d}", on_save_error=policy,
                                     async_save=True)
        outcome: dict[str, Any] = {"error": None}
        try:
            handler.train(EPOCHS + 1, seed=7, progress_bar=False)
        except Exception as error:
            outcome["error"] = error_record(error)
        outcome.update({
            "epoch": handler.epoch,
            "failed_saves": callback.failed_saves,
            "save_count": callback.save_count,
            "last_saved_path": callback.last_saved_path,
        })
        value = torch.tensor([1.0])
        dist.all_reduce(value)  # the ranks are still in step
        outcome["group_still_works"] = value.item()
        outcome["on_disk"] = on_disk(workdir / policy)
        result[policy] = outcome
    return result


class SeamSaver(Callback):
    """A saver of its own: a synchronous file and a background one per epoch, via the seam."""

    is_checkpoint_writer = True

    def __init__(self) -> None:
        self.background = BackgroundSave()
        self.saved: list[SavedCheckpoint] = []

    def on_epoch_end(self, handler: Trainer, epoch: int, logs: dict[str, Any],
                     **kwargs: Any) -> None:
        self._settle(handler)
        self.saved.append(handler.checkpoints.save(Path("own") / f"sync{epoch}.pth", logs))
        self.background.start(handler, Path("own") / f"bg{epoch}.pth", epoch, logs)

    def on_train_end(self, handler: Trainer, **kwargs: Any) -> None:
        self._settle(handler)
        self.background.release()

    def _settle(self, handler: Trainer) -> None:
        saved = self.background.settle(handler, wait=True)
        if saved is not None:
            handler.checkpoints.announce(saved)
            self.saved.append(saved)


def scenario_seam(workdir: Path) -> dict[str, Any]:
    handler = new_handler()
    events = SavedEvents()
    saver = SeamSaver()
    handler.add_callback(events)
    handler.add_callback(saver)
    handler.train(EPOCHS, seed=7, progress_bar=False)
    seen_at_return = on_disk(workdir / "own")
    dist.barrier()
    if RANK == 0:
        Path("a_file").write_text("not a folder")
    dist.barrier()
    outcome: dict[str, Any] = {"error": None}
    try:
        handler.checkpoints.save(Path("a_file") / "x.pth")
    except Exception as error:
        outcome["error"] = error_record(error)
    value = torch.tensor([1.0])
    dist.all_reduce(value)
    return {"writes": WRITES, "events": events.events, "on_disk_at_return": seen_at_return,
            "saved": [[str(s.path), s.epoch, s.size] for s in saver.saved],
            "failure": outcome, "group_still_works": value.item()}


def main() -> None:
    run_worker({
        "train": lambda workdir, _: scenario_train(workdir),
        "errors": lambda workdir, _: scenario_errors(workdir),
        "seam": lambda workdir, _: scenario_seam(workdir),
    }, RANK, WORLD_SIZE)



if __name__ == "__main__":
    main()
