"""Worker for tests/test_preemption_distributed.py, launched under torchrun (2 ranks, gloo, CPU).

    python -m torch.distributed.run --nproc_per_node=2 ... tests/preempt_ddp_worker.py SCENARIO DIR

Scenarios (each writes ``result_rank<r>.json`` into DIR, ``final.pth`` where training ends):

* ``reference`` — an uninterrupted run of EPOCHS epochs.
* ``one-rank`` — only rank 1 sends itself SIGUSR1, in the middle of an accumulation group of
  epoch 2: both ranks stop after the same optimizer step, one emergency checkpoint is written,
  and ``train`` returns normally with ``preempted`` on both ranks.
* ``both-ranks`` — rank 0 gets SIGTERM at batch 0 and rank 1 at batch 3 of epoch 2: the
  ranks stop after the same step.
* ``resume`` — every rank loads the emergency checkpoint named in ARGS and trains to EPOCHS.
* ``exception`` — save_on_exception under DDP: both ranks raise from a callback at the same
  batch; the exception propagates on both, no emergency checkpoint is written.

A watchdog dumps every thread's stack and exits if a scenario hangs.
"""

from __future__ import annotations

import faulthandler
import os
import signal
from pathlib import Path
from typing import Any

faulthandler.dump_traceback_later(100, exit=True)  # well inside the test's limit

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from dist_testing import error_record, history_of, run_worker  # noqa: E402
from nnh_testing import TinyNet, mae, regression_dataset  # noqa: E402
from torch import nn  # noqa: E402

from nnhandler import Callback, NNHandler  # noqa: E402

RANK = int(os.environ["RANK"])
WORLD_SIZE = int(os.environ["WORLD_SIZE"])
TRAIN_N = 125  # DistributedSampler pads to 63 per rank: 7 batches of 8, then 7
BATCH = 8
EPOCHS = 3
SEED = 11
SETTINGS: dict[str, Any] = {"gradient_accumulation_steps": 2, "ema_decay": 0.5, "seed": SEED,
                            "progress_bar": False}


class SignalAt(Callback):
    """Sends this process ``signal`` after batch ``batch`` of ``epoch`` (only on ``rank``)."""

    def __init__(self, rank: int, epoch: int, batch: int, number: int) -> None:
        self.rank, self.epoch, self.batch, self.number = rank, epoch, batch, number

    def on_train_batch_end(self, epoch: int, batch_idx: int, **kwargs: Any) -> None:
        if self.rank == RANK and (epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), self.number)


class Batches(Callback):
    """Which batches each rank trained: ``[epoch, batch_idx]`` in order."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def on_train_batch_end(self, epoch: int, batch_idx: int, **kwargs: Any) -> None:
        self.seen.append([epoch, batch_idx])


class RaiseAt(Callback):
    def on_train_batch_end(self, epoch: int, batch_idx: int, **kwargs: Any) -> None:
        if (epoch, batch_idx) == (2, 1):
            raise RuntimeError("failing on every rank")


def attach(handler: NNHandler) -> None:
    handler.set_train_loader(regression_dataset(TRAIN_N), batch_size=BATCH, shuffle=True)
    handler.set_val_loader(regression_dataset(31, seed=1), batch_size=BATCH)


def new_handler() -> NNHandler:
    torch.manual_seed(0)
    handler = NNHandler(TinyNet, device="cpu", logger_mode=NNHandler.LoggingMode.FILE,
                        log_file=f"nnhandler_rank{RANK}.log", dropout=0.2)
    handler.set_optimizer(torch.optim.Adam, lr=1e-2)
    handler.set_scheduler(torch.optim.lr_scheduler.StepLR, interval="step", step_size=2,
                          gamma=0.9)
    handler.set_loss_fn(nn.MSELoss)
    handler.add_metric("mae", mae)
    attach(handler)
    handler.auto_save(1, "ck", name="ep{epoch:03d}", save_on_signal=True)
    return handler


def finish(handler: NNHandler, batches: Batches) -> dict[str, Any]:
    handler.save("final.pth")
    return {"history": history_of(handler), "batches": batches.seen,
            "preempted": handler.preempted,
            "report": None if handler.preemption is None else {
                "signal": handler.preemption.signal, "epoch": handler.preemption.epoch,
                "batches": handler.preemption.batches,
                "paths": [str(p) for p in handler.preemption.paths]},
            "files": sorted(p.name for p in Path("ck").iterdir()) if Path("ck").exists() else []}


def scenario_reference(workdir: Path, args: list[str]) -> dict[str, Any]:
    handler, batches = new_handler(), Batches()
    handler.add_callback(batches)
    handler.train(EPOCHS, **SETTINGS)
    return finish(handler, batches)


def _interrupted(*signals: SignalAt) -> dict[str, Any]:
    handler, batches = new_handler(), Batches()
    handler.add_callback(batches)
    for sender in signals:
        handler.add_callback(sender)
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    handler.train(EPOCHS, **SETTINGS)
    after = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    result = finish(handler, batches)
    result["handlers_restored"] = before == after
    result["stopped_mid_epoch"] = handler.stopped_mid_epoch
    dist.barrier()
    return result


def scenario_one_rank(workdir: Path, args: list[str]) -> dict[str, Any]:
    return _interrupted(SignalAt(1, 2, 2, signal.SIGUSR1))  # batch 2 opens a group of 2


def scenario_both_ranks(workdir: Path, args: list[str]) -> dict[str, Any]:
    return _interrupted(SignalAt(0, 2, 0, signal.SIGTERM), SignalAt(1, 2, 3, signal.SIGTERM))


def scenario_resume(workdir: Path, args: list[str]) -> dict[str, Any]:
    handler = NNHandler.load(args[0], device="cpu", logger_mode=NNHandler.LoggingMode.FILE,
                             log_file=f"nnhandler_rank{RANK}.log")
    attach(handler)
    batches = Batches()
    handler.add_callback(batches)
    continued = handler.stopped_mid_epoch
    handler.train(until_epoch=EPOCHS, seed=SEED, progress_bar=False)
    result = finish(handler, batches)
    result["continued_mid_epoch"] = continued
    return result


def scenario_exception(workdir: Path, args: list[str]) -> dict[str, Any]:
    handler, batches = new_handler(), Batches()
    handler.add_callback(batches)
    handler.auto_save(1, "ck", name="ep{epoch:03d}", save_on_exception=True)
    handler.add_callback(RaiseAt())
    try:
        handler.train(EPOCHS, **SETTINGS)
    except RuntimeError as error:
        record = error_record(error)
        record["notes"] = list(getattr(error, "__notes__", []))
    else:
        record = {"type": None}
    log = Path(f"nnhandler_rank{RANK}.log").read_text()
    dist.barrier()
    return {"error": record, "files": sorted(p.name for p in Path("ck").iterdir()),
            "warned": "save_on_exception has no effect under DDP" in log}


if __name__ == "__main__":
    run_worker({"reference": scenario_reference, "one-rank": scenario_one_rank,
                "both-ranks": scenario_both_ranks, "resume": scenario_resume,
                "exception": scenario_exception}, RANK, WORLD_SIZE)
