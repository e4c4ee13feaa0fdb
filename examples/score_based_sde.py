"""Score-based generative model with the nnhandler-sde plugin: train, auto-save, resume, sample.

    pip install -e plugins/nnhandler-sde        # the plugin registers itself with nnhandler
    python examples/score_based_sde.py --out /tmp/sde

A tiny score network learns a mixture of four Gaussians in the plane by denoising score matching
under a variance-preserving SDE. ``ScoreSDE`` (a callback from the plugin) keeps the SDE, the
sampler settings and its own random stream in every checkpoint; ``NNHandler.load`` re-creates
it from the file through the plugin's entry point, without being told about it. After the
resume the script draws samples with the Euler-Maruyama sampler and checks that they match the
data: mean and variance within tolerance, and most samples near one of the four centres.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from nnhandler_sde import (
    VPSDE,
    DenoisingScoreMatchingLoss,
    EulerMaruyamaSampler,
    NoisedDataset,
    ScoreSDE,
    find_score_sde,
)
from torch import nn
from torch.utils.data import TensorDataset

from nnhandler import NNHandler

CENTRES = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
SPREAD = 0.15


class ScoreNet(nn.Module):
    """``score(x, t)``: an MLP on ``x`` and Fourier features of ``t``, divided by the VP SDE's
    marginal standard deviation (the score grows like ``1/std`` as ``t -> 0``)."""

    def __init__(self, hidden: int = 64, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        super().__init__()
        self.sde = VPSDE(beta_min, beta_max)
        self.register_buffer("frequencies", torch.arange(1, 9, dtype=torch.float32) * math.pi)
        self.net = nn.Sequential(nn.Linear(2 + 16, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.frequencies
        features = torch.cat([x, angles.sin(), angles.cos()], dim=1)
        return self.net(features) / self.sde.std(t)[:, None]


def mixture(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    which = torch.randint(0, len(CENTRES), (n,), generator=generator)
    return CENTRES[which] + SPREAD * torch.randn(n, 2, generator=generator)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("checkpoints/score_sde"))
    parser.add_argument("--epochs", type=int, default=30, help="before and after the resume")
    args = parser.parse_args()
    torch.set_num_threads(1)

    data = mixture(2048, seed=0)
    sde = VPSDE(beta_min=0.1, beta_max=20.0)
    training_set = NoisedDataset(TensorDataset(data), sde)

    torch.manual_seed(0)
    handler = NNHandler(ScoreNet, device="cpu", hidden=64, beta_min=sde.beta_min,
                        beta_max=sde.beta_max)
    handler.set_optimizer(torch.optim.Adam, lr=1e-2)
    handler.set_loss_fn(DenoisingScoreMatchingLoss)
    handler.set_train_loader(training_set, batch_size=128, shuffle=True)
    handler.add_callback(ScoreSDE(sde, data_shape=(2,), sampler=EulerMaruyamaSampler(steps=100),
                                  seed=0, sample_every=10, num_samples=512))
    handler.auto_save(interval=10, save_path=args.out, name="score_ep{epoch:03d}")
    handler.train(epochs=args.epochs, seed=0, ema_decay=0.99, progress_bar=False)

    latest = sorted(args.out.glob("score_ep*.pth"))[-1]
    resumed = NNHandler.load(latest)  # ScoreSDE comes back through the plugin's entry point
    try:
        score_sde = find_score_sde(resumed)
    except LookupError:
        print("the nnhandler-sde plugin is not installed (no 'nnhandler.plugins' entry point): "
              "pip install -e plugins/nnhandler-sde", file=sys.stderr)
        return 2
    print(f"resumed from {latest.name} at epoch {resumed.epoch}: {score_sde.sde!r}, "
          f"{score_sde.samples_drawn} samples drawn so far")
    resumed.set_train_loader(training_set)  # datasets are never in the file
    resumed.train(epochs=args.epochs, progress_bar=False)

    samples = score_sde.sample(resumed, 2000)
    mean, variance = samples.mean(dim=0), samples.var(dim=0)
    near = (torch.cdist(samples, CENTRES).min(dim=1).values < 3 * SPREAD).float().mean().item()
    print(f"epochs trained: {resumed.epoch}; final loss {resumed.train_losses[-1]:.4f}")
    print(f"samples: mean {mean.tolist()} (data {data.mean(dim=0).tolist()}), "
          f"variance {variance.tolist()} (data {data.var(dim=0).tolist()}), "
          f"{near:.0%} within 3 sd of a centre")
    ok = (bool((mean - data.mean(dim=0)).abs().max() < 0.2)
          and bool(((variance / data.var(dim=0)) - 1).abs().max() < 0.25) and near > 0.6)
    print("samples match the data" if ok else "samples do NOT match the data")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
