"""Worker for tests/test_extras_distributed.py, launched under torchrun (2 ranks, gloo, CPU).

    python -m torch.distributed.run --nproc_per_node=2 ... tests/ddp_extras_worker.py callbacks DIR

Scenario ``callbacks``: EarlyStopping, LearningRateMonitor, CSVLogger and (when installed)
TensorBoardLogger on two ranks with auto-save every epoch; then export and plots; then every rank
loads the epoch-2 checkpoint with fresh loggers and trains again. Each rank writes
``result_rank<r>.json`` for the test.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

faulthandler.dump_traceback_later(75, exit=True)  # well inside the test's 120 s limit

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from nnh_testing import TinyNet, mae, regression_dataset  # noqa: E402
from torch import nn  # noqa: E402

from nnhandler import (  # noqa: E402
    CSVLogger,
    EarlyStopping,
    LearningRateMonitor,
    NNHandler,
    TensorBoardLogger,
)

RANK = int(os.environ["RANK"])
HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def attach_loaders(handler: NNHandler) -> None:
    handler.set_train_loader(regression_dataset(60), batch_size=8, shuffle=True)
    handler.set_val_loader(regression_dataset(31, seed=1), batch_size=8)


def loggers() -> list[Any]:
    found: list[Any] = [LearningRateMonitor(), CSVLogger("train.csv")]
    if HAVE_TENSORBOARD:
        found.append(TensorBoardLogger("tb"))
    return found


def scenario_callbacks(workdir: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    handler = NNHandler(TinyNet, device="cpu", logger_mode=NNHandler.LoggingMode.FILE,
                        log_file=f"nnhandler_rank{RANK}.log")
    handler.set_optimizer(torch.optim.Adam, lr=1e-2)
    handler.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    handler.set_loss_fn(nn.MSELoss)
    handler.add_metric("mae", mae)
    attach_loaders(handler)
    stopping = EarlyStopping(patience=2, min_delta=1e9)  # stops after epoch 3
    handler.add_callback(stopping)
    for callback in loggers():
        handler.add_callback(callback)
    handler.auto_save(1, "ck", name="ep{epoch}")
    handler.train(10, seed=5, progress_bar=False)
    first_history = [dict(entry) for entry in handler.history]
    exported = handler.export("export/weights.pt")
    plots = []
    if HAVE_MATPLOTLIB:
        plots = [str(handler.plot_losses("plots/loss.png")),
                 str(handler.plot_metrics("plots/metrics.png"))]
    dist.barrier()
    weights_match = all(torch.equal(v, handler.module.state_dict()[k])
                        for k, v in torch.load(exported, weights_only=True).items())
    rows_after_first = Path("train.csv").read_text().splitlines()

    resumed = NNHandler.load("ck/ep2.pth", logger_mode=NNHandler.LoggingMode.FILE,
                             log_file=f"nnhandler_rank{RANK}.log",
                             callbacks=[EarlyStopping(patience=2, min_delta=1e9), *loggers()])
    attach_loaders(resumed)
    resumed.train(until_epoch=10, seed=5, progress_bar=False)
    dist.barrier()
    return {
        "stopped_epoch": stopping.stopped_epoch,
        "epoch": handler.epoch,
        "history": first_history,
        "resumed_epoch": resumed.epoch,
        "resumed_history": resumed.history,
        "weights_match": weights_match,
        "exported": str(exported),
        "plots": plots,
        "rows_after_first": rows_after_first,
        "rows_after_resume": Path("train.csv").read_text().splitlines(),
        "tensorboard_files": sorted(p.name for p in Path("tb").iterdir())
        if HAVE_TENSORBOARD else None,
    }


def main() -> None:
    scenario, workdir = sys.argv[1], Path(sys.argv[2]).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    try:
        if scenario != "callbacks":
            raise SystemExit(f"unknown scenario {scenario!r}")
        result = scenario_callbacks(workdir)
        context = {"enabled": True, "rank": dist.get_rank(), "world_size": dist.get_world_size(),
                   "device": "cpu", "model_is_ddp": True}
        result.update({"rank": RANK, "world_size": dist.get_world_size(), "context": context})
        (workdir / f"result_rank{RANK}.json").write_text(json.dumps(result, indent=1))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
