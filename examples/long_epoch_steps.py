"""A long epoch saved every N optimizer steps, killed with SIGKILL mid-epoch, resumed exactly.

    python examples/long_epoch_steps.py --out /tmp/long_epoch

When one epoch takes hours, epoch checkpoints are too rare: ``auto_save(every_n_steps=N)``
also saves inside the epoch, after every N-th optimizer step (``every_seconds=T`` would save
every T seconds of training instead). Such a checkpoint records where the epoch stands, so
loading it continues the epoch from its next batch, bit-identical to a run that was never
interrupted.

The script plays three parts, each its own process:

* the **job** (``--worker``): ``train(until_epoch=2, resume="latest", seed=s)`` — the
  restartable script; the first time it kills itself with SIGKILL in the middle of epoch 1
  (no handler runs, no emergency checkpoint: a node failure, an OOM kill);
* the **requeue**: the same job again, which resumes from the newest step checkpoint;
* the **reference**: the same training uninterrupted, whose final weights must be equal.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from nnhandler import Callback, NNHandler

SEED = 5
EPOCHS = 2
BATCHES = 96  # per epoch: the "long" epoch, 4 samples a batch
CHILD_TIMEOUT_S = 300


class Regressor(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.1),
                                    nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4 * BATCHES, 8, generator=generator)
    return TensorDataset(x, torch.sin(x[:, :4]).sum(dim=1, keepdim=True))


class KillAt(Callback):
    """SIGKILLs this process as batch ``batch`` (1-based) of epoch ``epoch`` starts."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_begin(self, epoch: int, batch_idx: int, **kwargs: Any) -> None:
        if (epoch, batch_idx + 1) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGKILL)


def job(out: Path | None, every: int, kill: tuple[int, int] | None) -> NNHandler:
    torch.manual_seed(SEED)  # the model's initial weights
    handler = NNHandler(Regressor, device="cpu")
    handler.set_optimizer(torch.optim.Adam, lr=3e-3)
    handler.set_loss_fn(nn.MSELoss())
    handler.set_train_loader(dataset(), batch_size=4, shuffle=True)
    if out is not None:
        handler.auto_save(None, out, name="long_ep{epoch:02d}_b{batch:03d}_step{step:04d}",
                          every_n_steps=every, keep_last=3)
    if kill is not None:
        handler.add_callback(KillAt(*kill))
    handler.train(until_epoch=EPOCHS, resume="latest" if out is not None else None,
                  seed=SEED, progress_bar=False, gradient_accumulation_steps=2)
    return handler


def run_job(out: Path, every: int, die_at: str | None) -> subprocess.CompletedProcess[str]:
    """The job script in a process of its own (``die_at``: ``EPOCH:BATCH`` to SIGKILL it)."""
    command = [sys.executable, __file__, "--worker", "--out", str(out), "--every", str(every)]
    if die_at is not None:
        command += ["--die-at", die_at]
    return subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--every", type=int, default=10, help="save every N optimizer steps")
    parser.add_argument("--kill-at", default="1:57",
                        help="EPOCH:BATCH at which the first job is killed (default 1:57)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--die-at", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        epoch, batch = map(int, (args.die_at or "0:0").split(":"))
        handler = job(args.out, args.every, (epoch, batch) if args.die_at else None)
        torch.save(handler.module.state_dict(), args.out / "final_weights.pt")
        print(f"job done at epoch {handler.epoch}, step {handler.global_step}")
        return

    killed = run_job(args.out, args.every, args.kill_at)
    print(f"first job: exit {killed.returncode} (SIGKILL is {-signal.SIGKILL})")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    latest = NNHandler.load_latest(args.out, device="cpu")
    assert latest is not None, "no checkpoint survived"
    print(f"newest checkpoint: epoch {latest.epoch} completed, step {latest.global_step}, "
          f"inside an epoch: {latest.stopped_mid_epoch}")
    requeued = run_job(args.out, args.every, None)
    assert requeued.returncode == 0, requeued.stdout + requeued.stderr
    print(f"requeued job: {requeued.stdout.strip()}")
    reference = job(None, args.every, None)
    resumed = torch.load(args.out / "final_weights.pt", weights_only=True)
    same = all(torch.equal(resumed[k], v) for k, v in reference.module.state_dict().items())
    print(f"checkpoints kept: {', '.join(sorted(p.name for p in args.out.glob('*.pth')))}")
    print(f"resumed exactly: {same}")
    assert same


if __name__ == "__main__":
    main()
