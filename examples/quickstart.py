"""Quickstart: train a small classifier with auto-save, then continue it from a checkpoint.

Runs in seconds on a CPU:

    python examples/quickstart.py                 # writes checkpoints/quickstart/
    python examples/quickstart.py --out /tmp/q --epochs 6

The dataset is built in (two interleaved spirals, generated deterministically), so nothing is
downloaded. The script trains ``--epochs`` epochs, auto-saving every ``--interval``, then does
what a restarted job does: ``NNHandler.load_latest`` rebuilds a fresh handler from the newest
checkpoint, and it trains ``--interval`` epochs more. At the end it prints how to continue.

Run it again with the same ``--out`` and it continues that run (``train(resume="latest")``):
one folder holds one run, whose epochs carry on from its newest checkpoint. A new ``--out``
starts a fresh run. Everything is seeded: two fresh runs end with the same numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from nnhandler import Callback, NNHandler, Trainer

DEFAULT_OUT = Path("checkpoints/quickstart")
DEFAULT_EPOCHS = 20
DEFAULT_INTERVAL = 5


def two_spirals(n_per_class: int = 200, noise: float = 0.15, seed: int = 0) -> TensorDataset:
    """A small two-class dataset of interleaved spirals (deterministic for a given seed)."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.linspace(0.25, 3 * math.pi, n_per_class)
    points, labels = [], []
    for label, phase in enumerate((0.0, math.pi)):
        xy = torch.stack([t * torch.cos(t + phase), t * torch.sin(t + phase)], dim=1) / 3 * math.pi
        points.append(xy + noise * torch.randn(xy.shape, generator=generator))
        labels.append(torch.full((n_per_class,), label, dtype=torch.long))
    return TensorDataset(torch.cat(points), torch.cat(labels))


class SpiralNet(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def accuracy(output: torch.Tensor, target: torch.Tensor) -> float:
    return (output.argmax(dim=1) == target).float().mean().item()


class RunReport(Callback):
    """Says which checkpoint a handler resumes from, and remembers the newest one it saved."""

    def __init__(self) -> None:
        self.newest: Path | None = None

    def on_checkpoint_loaded(self, handler: Trainer, path: Path, epoch: int,
                             **kwargs: Any) -> None:
        print(f"resumed from {path.name}: epoch {epoch}, {len(handler.history)} epochs of "
              "history")

    def on_checkpoint_saved(self, handler: Trainer, path: Path, epoch: int,
                            **kwargs: Any) -> None:
        self.newest = path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help="epochs to train before the restart (more, when continuing)")
    parser.add_argument("--interval", type=int, default=DEFAULT_INTERVAL,
                        help="auto-save every N epochs; the restarted job trains N more")
    args = parser.parse_args()

    train_set, val_set = two_spirals(seed=0), two_spirals(n_per_class=100, seed=1)
    report = RunReport()

    handler = NNHandler(model_class=SpiralNet, device="cpu",
                        logger_mode=NNHandler.LoggingMode.CONSOLE, seed=0,  # seeds the model
                        hidden=64)
    handler.set_optimizer(torch.optim.Adam, lr=1e-2)
    handler.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=10, gamma=0.5)
    handler.set_loss_fn(nn.CrossEntropyLoss)
    handler.set_train_loader(train_set, batch_size=32, shuffle=True)
    handler.set_val_loader(val_set, batch_size=128)
    handler.add_metric("accuracy", accuracy)
    handler.add_callback(report)
    handler.auto_save(interval=args.interval, save_path=args.out,
                      name="spiral_ep{epoch:03d}_acc{val_accuracy:.3f}")
    print(f"training {args.epochs} epochs into {args.out}/ (continuing the run there, if it "
          "holds one; a new --out starts a fresh run)")
    # resume="latest": continue from the newest valid checkpoint in the auto-save folder, if
    # any; `epochs` counts epochs to train now, on top of those already done
    handler.train(epochs=args.epochs, resume="latest", seed=0)

    # A restarted job: a fresh handler from the newest checkpoint (by recorded epoch, never by
    # file name or time), trained on from there.
    # datasets are never in the file (their DataLoader arguments are: batch size, shuffle)
    resumed = NNHandler.load_latest(args.out, device="cpu", callbacks=[report],
                                    train_data=train_set, val_data=val_set)
    final = resumed.train(epochs=args.interval)  # the seed is the run's, restored

    print(f"epochs trained: {resumed.epoch}; "
          f"final val accuracy {resumed.val_metrics_history['accuracy'][-1]:.3f}")
    print("final logs:", " ".join(f"{key}={value!r}" for key, value in final.items()))
    print("checkpoints:", ", ".join(p.name for p in sorted(args.out.glob("*.pth"))))
    print_how_to_continue(args, report.newest)


def print_how_to_continue(args: argparse.Namespace, newest: Path | None) -> None:
    command = ["python", sys.argv[0], "--out", str(args.out)]
    if args.interval != DEFAULT_INTERVAL:
        command += ["--interval", str(args.interval)]
    print(f"\nnewest checkpoint: {newest}")
    print(f"to continue this run: {shlex.join(command)}")
    print("or, in a script of your own (SpiralNet, accuracy, train_set and val_set as here):")
    # a class or function is restored by its recorded name (here __main__.SpiralNet), which
    # another script's __main__ does not have: that script passes them again
    print(f"    handler = NNHandler.load_latest({json.dumps(str(args.out))}, device=\"cpu\", "
          "model_class=SpiralNet,")
    print("                                    train_data=train_set, val_data=val_set)")
    print("    handler.add_metric(\"accuracy\", accuracy)")
    print(f"    handler.train(epochs={args.interval})")


if __name__ == "__main__":
    main()
