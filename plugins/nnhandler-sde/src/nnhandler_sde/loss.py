"""Denoising score matching: the data side (perturbed samples) and the loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .sde import SDE

__all__ = ["DenoisingScoreMatchingLoss", "NoisedDataset"]


class NoisedDataset(Dataset[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]):
    """Clean samples turned into denoising score-matching examples.

    Item ``i`` is ``((x_t, t), target)``: ``t ~ U(eps, 1)``, ``x_t = m(t) x0 + std(t) z`` with
    ``z ~ N(0, I)``, and ``target = stack([z, std(t)])`` (shape ``(2, *x0.shape)``) for
    :class:`DenoisingScoreMatchingLoss`. The model is called as ``model(x_t, t)``. A
    ``DataLoader`` fetches whole batches through ``__getitems__`` (one draw of times and noise
    per batch, which is what makes it fast). ``x0`` is the
    item of ``dataset`` (or its first element when that is a tuple). The noise comes from
    torch's global random stream, which nnhandler seeds, saves and restores, so a resumed run
    sees the same noise (with ``num_workers > 0`` each worker's stream is derived from it).
    """

    def __init__(self, dataset: Dataset[Any], sde: SDE, eps: float = 1e-5) -> None:
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
        self.dataset, self.sde, self.eps = dataset, sde, eps

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(
        self, indices: list[int]
    ) -> list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """A whole batch at once (``DataLoader`` calls this): one draw of times and noise."""
        x0 = torch.stack([self._clean(index) for index in indices])
        t = self.eps + (1.0 - self.eps) * torch.rand((len(indices),), dtype=x0.dtype)
        noise = torch.randn_like(x0)
        x_t, std = self.sde.perturb(x0, t, noise)
        target = torch.stack([noise, std.expand_as(noise)], dim=1)
        return [((x_t[i], t[i]), target[i]) for i in range(len(indices))]

    def _clean(self, index: int) -> torch.Tensor:
        item = self.dataset[index]
        x0 = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x0, torch.Tensor):
            raise TypeError(f"NoisedDataset: item {index} is {type(x0).__qualname__}, "
                            "expected a tensor")
        return x0


class DenoisingScoreMatchingLoss(nn.Module):
    """``mean_i || std_i * score_i + z_i ||^2`` — denoising score matching with the weighting
    ``lambda(t) = std(t)^2``, whose minimiser is the score of the perturbed data.

    Called as ``loss(score, target)`` with ``target`` from :class:`NoisedDataset`. An
    ``nn.Module`` without arguments, so :meth:`NNHandler.load <nnhandler.NNHandler.load>`
    restores it by reference.
    """

    def forward(self, score: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() < 2 or target.shape[1] != 2 or target[:, 0].shape != score.shape:
            raise ValueError(f"target of shape {tuple(target.shape)} does not fit a score of "
                             f"shape {tuple(score.shape)}: expected (batch, 2, *score.shape[1:])"
                             " from NoisedDataset")
        noise, std = target.unbind(1)
        return (std * score + noise).pow(2).flatten(1).sum(dim=1).mean()
