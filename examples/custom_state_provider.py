"""Write your own state-providing callback: its state rides along in every checkpoint.

    python examples/custom_state_provider.py --out /tmp/custom --epochs 4

``BestValidationTracker`` remembers the best validation loss and the epoch it happened. Because
it defines ``state_key``, ``state_dict()`` and ``load_state_dict()`` it is a ``StateProvider``:
``AutoSaveCallback`` saves its state with the model, and ``NNHandler.load(...,
callbacks=[tracker])`` hands it back, so the record survives a restart.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from nnhandler import Callback, NNHandler


class BestValidationTracker(Callback):
    """Adds ``best_val_loss`` to the epoch logs (usable in auto-save name templates)."""

    state_key = "best_validation_tracker"

    def __init__(self) -> None:
        self.best_loss = math.inf
        self.best_epoch = 0

    def on_epoch_end(self, epoch: int, logs: dict[str, Any], **kwargs: Any) -> None:
        if "val_loss" in logs and logs["val_loss"] < self.best_loss:
            self.best_loss, self.best_epoch = logs["val_loss"], epoch
        logs["best_val_loss"] = self.best_loss

    # StateProvider: plain data only (the file opens with torch.load(weights_only=True)).
    def state_dict(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss, self.best_epoch = float(state["best_loss"]), int(state["best_epoch"])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def dataset(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=generator)
    return TensorDataset(x, (x**2).sum(dim=1, keepdim=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("checkpoints/custom"))
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()

    handler = NNHandler(Net, device="cpu")
    handler.set_optimizer(torch.optim.Adam, lr=1e-2)
    handler.set_loss_fn(nn.MSELoss)
    handler.set_train_loader(dataset(128, 0), batch_size=16, shuffle=True)
    handler.set_val_loader(dataset(64, 1), batch_size=64)
    handler.add_callback(BestValidationTracker())
    handler.auto_save(interval=args.epochs, save_path=args.out,
                      name="net_ep{epoch:02d}_best{best_val_loss:.3f}")
    handler.train(epochs=args.epochs, seed=0, progress_bar=False)

    checkpoint = sorted(args.out.glob("*.pth"))[-1]
    tracker = BestValidationTracker()
    resumed = NNHandler.load(checkpoint, callbacks=[tracker])
    print(f"restored from {checkpoint.name}: best val loss {tracker.best_loss:.4f} "
          f"at epoch {tracker.best_epoch}")
    resumed.set_train_loader(dataset(128, 0))
    resumed.set_val_loader(dataset(64, 1))
    resumed.train(epochs=2, seed=0, progress_bar=False)
    print(f"after 2 more epochs: best {tracker.best_loss:.4f} at epoch {tracker.best_epoch}")


if __name__ == "__main__":
    main()
