"""A preemptible, requeued job: SIGTERM mid-epoch, an emergency checkpoint, an exact resume.

    python examples/preemptible_training.py --out /tmp/preempt

The script plays both parts of a cluster job:

* the **training script** (``--worker``), written as a restartable job script should be:
  ``train(until_epoch=E, resume="latest", seed=s)`` continues from the newest valid checkpoint
  in the auto-save folder (or starts fresh), and exits with status 3 when it was preempted so
  that the job script requeues it;
* the **scheduler** (the default): it starts the worker, sends it SIGTERM in the middle of an
  epoch (as SLURM does before a time limit or a preemption), and starts it again while it
  exits with 3 — the requeue. Then it trains the same model uninterrupted in this process and
  checks that the weights of the preempted-and-resumed run are bit-identical.

The auto-saver keeps the 2 latest end-of-epoch files (``keep_last=2``); the emergency file
``preempted_ep…_b….pth`` counts as a recent file, so the resumed run's saves age it out.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from nnhandler import Callback, NNHandler

EPOCHS = 6
SEED = 3
REQUEUE_STATUS = 3


class Regressor(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.1),
                                    nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=generator)
    return TensorDataset(x, torch.sin(x[:, :4]).sum(dim=1, keepdim=True))


class ReportBatches(Callback):
    """Prints the position after every batch, so the scheduler knows when to strike."""

    def on_train_batch_end(self, epoch: int, batch_idx: int, **kwargs: object) -> None:
        print(f"at epoch {epoch} batch {batch_idx}", flush=True)


def build(out: Path | None) -> NNHandler:
    torch.manual_seed(SEED)  # the model's initial weights
    handler = NNHandler(Regressor, device="cpu", hidden=32)
    handler.set_optimizer(torch.optim.AdamW, lr=3e-3)
    handler.set_scheduler(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=EPOCHS * 32,
                          interval="step")
    handler.set_loss_fn(nn.MSELoss)
    handler.set_train_loader(dataset(), batch_size=16, shuffle=True)
    if out is not None:
        handler.auto_save(interval=1, save_path=out, name="ep{epoch:03d}", keep_last=2,
                          save_on_signal=True)
    return handler


def worker(out: Path) -> int:
    handler = build(out)
    handler.add_callback(ReportBatches())
    handler.train(until_epoch=EPOCHS, resume="latest", seed=SEED, progress_bar=False)
    if handler.preempted:
        assert handler.preemption is not None
        print(f"preempted; resume from {handler.preemption.paths[0].name}", flush=True)
        return REQUEUE_STATUS
    print(f"finished: epoch {handler.epoch}, loss {handler.train_losses[-1]:.6f}", flush=True)
    return 0


def schedule(out: Path, strike_at: tuple[int, int]) -> None:
    command = [sys.executable, __file__, "--worker", "--out", str(out)]
    for attempt in (1, 2, 3):
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None
        for line in process.stdout:
            if attempt == 1 and line.strip() == f"at epoch {strike_at[0]} batch {strike_at[1]}":
                process.send_signal(signal.SIGTERM)
            if not line.startswith("at epoch"):
                print(f"[job attempt {attempt}] {line.strip()}")
        status = process.wait(timeout=120)
        if status != REQUEUE_STATUS:
            break
        print(f"[scheduler] exit status {status}: requeued")
    if status != 0:
        raise SystemExit(f"the training job failed with exit status {status}")

    print("files:", sorted(p.name for p in out.glob("*.pth")))
    resumed = NNHandler.load_latest(out, device="cpu")
    uninterrupted = build(None)
    uninterrupted.train(EPOCHS, seed=SEED, progress_bar=False)
    same = all(torch.equal(a, b) for a, b in zip(
        resumed.module.state_dict().values(), uninterrupted.module.state_dict().values(),
        strict=True))
    print(f"preempted-and-resumed run equals the uninterrupted run: {same}")
    if not same:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("checkpoints/preemptible"))
    parser.add_argument("--worker", action="store_true", help="run the training script itself")
    parser.add_argument("--strike", default="3,13",
                        help="epoch,batch after which the scheduler sends SIGTERM")
    args = parser.parse_args()
    if args.worker:
        sys.exit(worker(args.out))
    epoch, batch = (int(part) for part in args.strike.split(","))
    schedule(args.out, (epoch, batch))


if __name__ == "__main__":
    main()
