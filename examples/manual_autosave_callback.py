"""Attach ``AutoSaveCallback``s by hand: a rolling "latest" file, a file every N epochs, and the
two best epochs by validation loss.

    python examples/manual_autosave_callback.py --out /tmp/manual --epochs 6

Each callback derives its ``state_key`` from its ``save_path`` and ``name``, so both live on one
handler, both go into every checkpoint, and both come back on ``NNHandler.load`` with their
bookkeeping: the resumed "latest" callback replaces the file its lineage wrote. The "latest"
one saves every epoch, so it writes in the background (``async_save=True``): training pays only
for a copy of the state into host memory, and ``train`` returns once the file is on disk. The
"best" one saves every epoch and keeps the two with the lowest ``val_loss`` (and the newest, the
resume point); ``best/nnhandler-index.json`` says why each file is kept
(``nnhandler list /tmp/manual/best`` shows it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from nnhandler import AutoSaveCallback, NNHandler


class Regressor(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def dataset(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    return TensorDataset(x, x[:, :4].sum(dim=1, keepdim=True) - x[:, 4:].mean(dim=1, keepdim=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("checkpoints/manual"))
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()

    handler = NNHandler(Regressor, device="cpu", hidden=32)
    handler.set_optimizer(torch.optim.SGD, lr=0.05, momentum=0.9)
    handler.set_loss_fn(nn.MSELoss)
    handler.set_train_loader(dataset(256, seed=0), batch_size=32, shuffle=True)
    handler.set_val_loader(dataset(64, seed=1), batch_size=64)

    latest = AutoSaveCallback(interval=1, save_path=args.out, name="latest", overwrite=True,
                              async_save=True)
    every_two = AutoSaveCallback(interval=2, save_path=args.out / "history",
                                 name="regressor_ep{epoch:03d}_val{val_loss:.4f}")
    best = AutoSaveCallback(interval=1, save_path=args.out / "best",
                            name="regressor_ep{epoch:03d}_val{val_loss:.4f}",
                            keep_best=2, monitor="val_loss", mode="min")
    handler.add_callback(latest)
    handler.add_callback(every_two)
    handler.add_callback(best)
    handler.train(epochs=args.epochs, seed=1, progress_bar=False)

    print("latest:", sorted(p.name for p in args.out.glob("*.pth")))
    print("history:", sorted(p.name for p in (args.out / "history").glob("*.pth")))
    for entry in best.retention.state.files:
        print(f"best: {entry.name} kept as {', '.join(entry.reasons)}")

    # Both callbacks come back with the handler; training on keeps both schedules.
    resumed = NNHandler.load(args.out / "latest.pth")
    resumed.set_train_loader(dataset(256, seed=0))
    resumed.set_val_loader(dataset(64, seed=1))
    print("restored callbacks:", [repr(cb) for cb in resumed.callbacks])
    resumed.train(epochs=2, seed=1, progress_bar=False)
    print(f"after resume: epoch {resumed.epoch}, history files:",
          sorted(p.name for p in (args.out / "history").glob("*.pth")))


if __name__ == "__main__":
    main()
