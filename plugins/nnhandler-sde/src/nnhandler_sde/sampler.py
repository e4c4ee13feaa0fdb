"""Reverse-time sampling: Euler-Maruyama predictor with an optional Langevin corrector."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from .sde import SDE, broadcast_to

__all__ = ["EulerMaruyamaSampler", "SamplerConfig", "ScoreFunction"]

#: ``score(x, t) -> ∇_x log p_t(x)`` for a batch ``x`` and times ``t`` of shape ``(batch,)``.
ScoreFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SamplerConfig(BaseModel):
    """Validated settings of :class:`EulerMaruyamaSampler`."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    steps: Annotated[int, Field(ge=1)] = 500
    eps: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-3
    corrector_steps: Annotated[int, Field(ge=0)] = 0
    snr: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 0.16


class EulerMaruyamaSampler:
    """Integrate the reverse-time SDE ``dx = [f(x,t) - g(t)^2 score(x,t)] dt + g(t) dw̄`` from
    ``t = 1`` down to ``eps`` in ``steps`` Euler-Maruyama steps.

    With ``corrector_steps > 0`` each step is followed by that many Langevin MCMC steps whose
    size is set by the signal-to-noise ratio ``snr`` (the predictor-corrector sampler of Song et
    al., 2021). The last step returns the noise-free mean. All randomness comes from the
    ``generator`` passed to :meth:`sample`, so a sampler with a restored generator reproduces
    its draws exactly.
    """

    def __init__(self, steps: int = 500, eps: float = 1e-3, corrector_steps: int = 0,
                 snr: float = 0.16) -> None:
        self.settings = SamplerConfig(steps=steps, eps=eps, corrector_steps=corrector_steps,
                                      snr=snr)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> EulerMaruyamaSampler:
        return cls(**config)

    def config(self) -> dict[str, Any]:
        return self.settings.model_dump()

    def __repr__(self) -> str:
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"EulerMaruyamaSampler({arguments})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EulerMaruyamaSampler) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(tuple(self.config().items()))

    @torch.no_grad()
    def sample(self, score: ScoreFunction, sde: SDE, shape: tuple[int, ...],
               generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        """Draw ``shape[0]`` samples of shape ``shape[1:]``.

        Noise is drawn on the generator's device (a CPU generator gives the same samples on
        every device) and moved to ``device``, where ``score`` runs.
        """
        s = self.settings

        def normal() -> torch.Tensor:
            return torch.randn(shape, generator=generator, device=generator.device).to(device)

        x = sde.prior_sample(shape, generator).to(device)
        times = torch.linspace(1.0, s.eps, s.steps + 1, dtype=torch.float64).tolist()
        mean = x
        for t_now, t_next in itertools.pairwise(times):
            t = torch.full((shape[0],), t_now, device=device, dtype=x.dtype)
            dt = t_next - t_now  # negative: backwards in time
            for _ in range(s.corrector_steps):
                x = self._langevin_step(score, sde, x, t, dt, normal())
            drift, diffusion = sde.coefficients(x, t)
            g = broadcast_to(diffusion, x)
            mean = x + (drift - g**2 * score(x, t)) * dt
            x = mean + g * abs(dt) ** 0.5 * normal()
        return mean

    def _langevin_step(self, score: ScoreFunction, sde: SDE, x: torch.Tensor, t: torch.Tensor,
                       dt: float, noise: torch.Tensor) -> torch.Tensor:
        grad = score(x, t)
        grad_norm = grad.flatten(1).norm(dim=1).mean()
        noise_norm = noise.flatten(1).norm(dim=1).mean()
        alpha = broadcast_to(sde.langevin_alpha(t, dt), x)
        ratio = self.settings.snr * noise_norm / grad_norm.clamp_min(1e-12)
        step: torch.Tensor = 2.0 * alpha * ratio**2
        return x + step * grad + torch.sqrt(2.0 * step) * noise
