"""Data-parallel training under torchrun, restartable from its own checkpoints.

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py     # 2 processes, one node
    python examples/ddp_train.py                                       # 1 process

The same script runs unchanged as one process, under ``torchrun`` on one or several nodes, and
under SLURM (see docs/distributed.md). ``NNHandler`` reads the launcher's
variables, creates the process group (nccl on GPUs, gloo on CPUs), puts each rank on its own
device, wraps the model in DDP and shards the data. Only rank 0 writes checkpoints.

Run it again with a larger ``--epochs`` and it continues from ``latest.pth`` — also at another
world size, which is allowed and logs a warning that the result cannot equal an uninterrupted
run exactly. That is also what makes ``torchrun --max_restarts=N`` restart it safely.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from quickstart import SpiralNet, accuracy, two_spirals  # the same data and model (examples/)
from torch import nn

from nnhandler import AutoSaveCallback, Callback, NNHandler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("checkpoints/ddp"))
    parser.add_argument("--epochs", type=int, default=10, help="train up to this epoch")
    args = parser.parse_args()

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    handler = NNHandler(model_class=SpiralNet, device=None,  # each rank's own GPU, else CPU
                        logger_mode=NNHandler.LoggingMode.CONSOLE, hidden=64)
    handler.set_optimizer(torch.optim.Adam, lr=1e-2)
    handler.set_loss_fn(nn.CrossEntropyLoss)
    handler.set_train_loader(two_spirals(seed=0), batch_size=32, shuffle=True)
    handler.set_val_loader(two_spirals(n_per_class=100, seed=1), batch_size=128)
    handler.add_metric("accuracy", accuracy)
    # the checkpoint a restarted job continues from, rewritten every epoch ...
    handler.auto_save(interval=1, save_path=args.out, name="latest", overwrite=True)
    # ... and a permanent one every 5 epochs
    handler.add_callback(AutoSaveCallback(5, args.out, name="ep{epoch:03d}"))

    resumed = ResumeReport()
    handler.add_callback(resumed)
    # resume="latest": first restore the newest valid checkpoint in args.out, if there is one
    logs = handler.train(until_epoch=args.epochs, resume="latest", seed=0, progress_bar=False)
    ctx = handler.distributed
    if ctx.is_main:
        print("started fresh" if resumed.epoch is None else f"resumed from epoch {resumed.epoch}")
    print(f"rank {ctx.rank} of {ctx.world_size}: epoch {handler.epoch}, "
          f"loss {logs['loss']:.6f}, val accuracy {logs['val_accuracy']:.3f}")


class ResumeReport(Callback):
    """Remembers the epoch of the checkpoint ``train(resume="latest")`` restored."""

    def __init__(self) -> None:
        self.epoch: int | None = None

    def on_checkpoint_loaded(self, epoch: int, **kwargs: object) -> None:
        self.epoch = epoch


if __name__ == "__main__":
    main()
