"""FSDP2 training with sharded checkpoints (torch.distributed.checkpoint), restartable.

Train on two processes (CPU/gloo here; one GPU per process with nccl where there are GPUs)::

    torchrun --standalone --nproc_per_node=2 examples/fsdp_sharded.py --epochs 6

Every rank writes its own shards into ``checkpoints/fsdp/net_ep002.dcp/`` … and
``latest.dcp/``; running the same command again resumes from the newest one. Then gather a
sharded checkpoint into one ordinary ``.pth`` file in a single process::

    python examples/fsdp_sharded.py --consolidate checkpoints/fsdp/latest.dcp
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from nnhandler import AutoSaveCallback, NNHandler


class Block(nn.Module):
    """A residual MLP block: each one becomes its own FSDP unit."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(width, width), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer(x)


class Net(nn.Module):
    def __init__(self, width: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.blocks = nn.Sequential(*(Block(width) for _ in range(depth)))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)))


def mae(output: torch.Tensor, target: torch.Tensor) -> float:
    return float((output - target).abs().mean())


def dataset(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    return TensorDataset(x, x[:, :4].sum(dim=1, keepdim=True).sin())


def train(epochs: int, out: Path) -> None:
    torch.manual_seed(0)  # the same initial weights on every rank
    handler = NNHandler(Net, device=None, parallelism="fsdp", fsdp_units=[Block], width=32)
    handler.set_optimizer(torch.optim.AdamW, lr=3e-3)
    handler.set_loss_fn(nn.MSELoss)
    handler.add_metric("mae", mae)
    handler.set_train_loader(dataset(512, seed=1), batch_size=32, shuffle=True)
    handler.set_val_loader(dataset(101, seed=2), batch_size=32)
    handler.auto_save(interval=2, save_path=out, name="net_ep{epoch:03d}")
    handler.add_callback(AutoSaveCallback(1, out, name="latest", overwrite=True))
    logs = handler.train(until_epoch=epochs, resume="latest", seed=0, progress_bar=False)
    if handler.distributed.is_main:
        print(f"world size {handler.distributed.world_size}, epoch {handler.epoch}, "
              f"val_loss {logs.get('val_loss', float('nan')):.4f}")
        print("checkpoints:", ", ".join(sorted(p.name for p in out.glob("*.dcp"))))


def consolidate(path: Path) -> None:
    handler = NNHandler.load(path, device="cpu", use_distributed=False, parallelism="none")
    target = handler.save(path.with_suffix(".pth"))
    print(f"consolidated epoch {handler.epoch} into {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("checkpoints/fsdp"))
    parser.add_argument("--consolidate", type=Path, metavar="DIR.dcp")
    args = parser.parse_args()
    if args.consolidate is not None:
        consolidate(args.consolidate)
        return
    try:
        train(args.epochs, args.out)
    finally:
        # the handler joined (or created) the process group; leaving it to the interpreter's
        # exit can abort a rank in gloo/nccl's thread teardown
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
