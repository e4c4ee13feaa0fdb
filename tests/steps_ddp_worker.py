"""Worker script for tests/test_step_saves_distributed.py, launched under torchrun (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node=N tests/steps_ddp_worker.py SCENARIO DIR

Scenarios (each writes ``result_rank<r>.json`` in DIR):

* ``steps``   — DDP on N ranks: ``every_n_steps=3`` with ``interval=1`` and gradient
  accumulation; every rank records the steps saved; then each mid-epoch checkpoint is loaded
  into a fresh handler and trained to the end, compared with the uninterrupted run.
* ``time``    — N ranks: ``every_seconds=5`` on a clock that only rank 0's training moves (one
  second per batch; the other ranks' clocks stand still): rank 0 decides, every rank saves at
  the same steps. Then the per-step cost of the agreement: a run whose time trigger never
  fires against the same run without one.
* ``sharded`` — 2 ranks, FSDP2: ``every_n_steps`` writes ``.dcp`` directories inside epochs; one
  is loaded and trained on, and the full parameters equal the uninterrupted run's.
"""

from __future__ import annotations

import faulthandler
import os
import time
from pathlib import Path
from typing import Any

faulthandler.dump_traceback_later(240, exit=True)  # inside the test's limit

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from dist_testing import history_of, run_worker  # noqa: E402
from nnh_testing import TinyNet, mae, regression_dataset  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from nnhandler import Callback, NNHandler  # noqa: E402

RANK = int(os.environ["RANK"])
WORLD_SIZE = int(os.environ["WORLD_SIZE"])
TRAIN_N = 96
BATCH = 4
SEED = 9
EPOCHS = 2


class SavedSteps(Callback):
    def __init__(self) -> None:
        self.saved: list[tuple[int, str]] = []

    def on_checkpoint_saved(self, handler: Any, path: Path, **kwargs: Any) -> None:
        self.saved.append((handler.global_step, Path(path).name))


class StepTimer(Callback):
    """Seconds per step between the first and the last batch of a call (its set-up, such as
    the agreement's group, excluded)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, **kwargs: Any) -> None:
        self.times.append(time.perf_counter())

    @property
    def per_step(self) -> float:
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Ticking(Callback):
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_train_batch_begin(self, **kwargs: Any) -> None:
        self.clock.now += 1.0


def attach_loaders(handler: NNHandler, n: int = TRAIN_N) -> None:
    handler.set_train_loader(regression_dataset(n), batch_size=BATCH, shuffle=True)
    handler.set_val_loader(regression_dataset(17, seed=1), batch_size=BATCH)


def new_handler(**arguments: Any) -> NNHandler:
    torch.manual_seed(0)
    handler = NNHandler(TinyNet, device="cpu", logger_mode=NNHandler.LoggingMode.FILE,
                        log_file=f"nnhandler_rank{RANK}.log", **arguments)
    handler.set_optimizer(torch.optim.Adam, lr=1e-2)
    handler.set_loss_fn(nn.MSELoss)
    handler.add_metric("mae", mae)
    attach_loaders(handler)
    return handler


def full_params(handler: NNHandler) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in handler.module.state_dict().items()}


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {"equal": all(torch.equal(a[k], b[k]) for k in a),
            "max_abs": max(float((a[k] - b[k]).abs().max()) for k in a)}


def resume_each(files: list[Path], reference: dict[str, torch.Tensor],
                history: dict[str, Any]) -> dict[str, Any]:
    """Load every checkpoint in ``files`` into a fresh handler, train to the end, compare."""
    outcome = {}
    for path in files:
        resumed = NNHandler.load(path, logger_mode=NNHandler.LoggingMode.FILE,
                                 log_file=f"nnhandler_rank{RANK}.log")
        mid = resumed.stopped_mid_epoch
        attach_loaders(resumed)
        if "mae" not in resumed.metrics:  # a test module's function is not always restored
            resumed.add_metric("mae", mae)
        resumed.train(until_epoch=EPOCHS, progress_bar=False)
        outcome[path.name] = {"mid_epoch": mid, **differences(full_params(resumed), reference),
                              "same_history": history_of(resumed)["train_losses"]
                              == history["train_losses"]}
    return outcome


# -- scenarios ---------------------------------------------------------------------------------
def scenario_steps(workdir: Path) -> dict[str, Any]:
    handler = new_handler()
    handler.auto_save(1, "ck", name="s{step:03d}_ep{epoch}_b{batch}", every_n_steps=3)
    record = SavedSteps()
    handler.add_callback(record)
    handler.train(EPOCHS, seed=SEED, gradient_accumulation_steps=2, progress_bar=False)
    reference, history = full_params(handler), history_of(handler)
    dist.barrier()
    files = sorted(p for p in (workdir / "ck").glob("*.pth"))
    return {"saved": record.saved, "files": [p.name for p in files], "history": history,
            "resumed": resume_each([p for p in files if torch.load(p, weights_only=True)[
                "state"]["position"]["partial"] is not None], reference, history)}


def scenario_time(workdir: Path) -> dict[str, Any]:
    handler = new_handler()
    saver = handler.auto_save(None, "ck", name="t{step:03d}", every_seconds=5.0)
    clock = FakeClock()
    saver.schedule.clock = clock
    if RANK == 0:
        handler.add_callback(Ticking(clock))
    record = SavedSteps()
    handler.add_callback(record)
    handler.train(3, seed=SEED, progress_bar=False)
    # the agreement's cost: a trigger that never fires against none, interleaved
    n = 16 * TRAIN_N
    timings: dict[str, list[float]] = {"with": [], "without": []}
    for round_ in range(3):
        for kind in ("without", "with"):
            timed = new_handler()
            attach_loaders(timed, n=n)
            timer = StepTimer()
            timed.add_callback(timer)
            if kind == "with":  # checks at its measured cadence; 1 s would check every step
                timed.auto_save(None, f"timed{round_}", every_seconds=1.0 if round_ else 1e9)
            dist.barrier()
            timed.train(1, seed=SEED, progress_bar=False)
            timings[kind].append(timer.per_step)
    return {"saved": record.saved, "steps_per_epoch": handler.global_step // 3,
            "per_step_s": timings}


def scenario_sharded(workdir: Path) -> dict[str, Any]:
    handler = new_handler(parallelism="fsdp", fsdp_units=[nn.Linear])
    handler.auto_save(None, "ck", name="s{step:03d}", every_n_steps=3)
    record = SavedSteps()
    handler.add_callback(record)
    handler.train(EPOCHS, seed=SEED, progress_bar=False)
    reference, history = full_params(handler), history_of(handler)
    dist.barrier()
    files = sorted((workdir / "ck").glob("*.dcp"))
    return {"saved": record.saved, "files": [p.name for p in files],
            "resumed": resume_each(files[:2], reference, history)}


def main() -> None:
    def prepare(workdir: Path) -> None:
        dist.init_process_group("gloo")

    run_worker({
        "steps": lambda workdir, _: scenario_steps(workdir),
        "time": lambda workdir, _: scenario_time(workdir),
        "sharded": lambda workdir, _: scenario_sharded(workdir),
    }, RANK, WORLD_SIZE, before=prepare)


if __name__ == "__main__":
    main()
