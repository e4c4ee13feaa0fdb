"""Quickstart: train a small classifier with auto-save, then resume from a checkpoint.

Runs in seconds on a CPU:

    python examples/quickstart.py                 # writes checkpoints/quickstart/
    python examples/quickstart.py --out /tmp/q --epochs 6

The dataset is built in (two interleaved spirals, generated deterministically), so nothing is
downloaded. The script trains, auto-saves every few epochs, loads the newest checkpoint into a
fresh handler as a restarted job would, and trains on from there.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from nnhandler import NNHandler


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("checkpoints/quickstart"))
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the first run")
    parser.add_argument("--interval", type=int, default=5, help="auto-save every N epochs")
    args = parser.parse_args()

    train_set, val_set = two_spirals(seed=0), two_spirals(n_per_class=100, seed=1)

    handler = NNHandler(model_class=SpiralNet, device="cpu",
                        logger_mode=NNHandler.LoggingMode.CONSOLE, hidden=64)
    handler.set_optimizer(torch.optim.Adam, lr=1e-2)
    handler.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=10, gamma=0.5)
    handler.set_loss_fn(nn.CrossEntropyLoss)
    handler.set_train_loader(train_set, batch_size=32, shuffle=True)
    handler.set_val_loader(val_set, batch_size=128)
    handler.add_metric("accuracy", accuracy)
    handler.auto_save(interval=args.interval, save_path=args.out,
                      name="spiral_ep{epoch:03d}_acc{val_accuracy:.3f}")
    handler.train(epochs=args.epochs, seed=0)

    # A restarted job: load the newest checkpoint (by recorded epoch) and continue.
    checkpoints = sorted(args.out.glob("spiral_ep*.pth"))
    latest = checkpoints[-1]
    resumed = NNHandler.load(latest, device="cpu")
    resumed.set_train_loader(train_set)  # datasets are never in the file; arguments are
    resumed.set_val_loader(val_set)      # remembered (batch size, shuffle)
    print(f"resumed from {latest.name}: {len(resumed.train_losses)} epochs of history")
    resumed.train(epochs=args.interval, seed=0)  # `epochs` means additional epochs

    print(f"epochs trained: {resumed.epoch}; "
          f"final val accuracy {resumed.val_metrics_history['accuracy'][-1]:.3f}")
    print("checkpoints:", ", ".join(p.name for p in sorted(args.out.glob("*.pth"))))


if __name__ == "__main__":
    main()
