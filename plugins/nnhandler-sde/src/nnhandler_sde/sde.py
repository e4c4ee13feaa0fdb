"""Variance-preserving and variance-exploding SDEs (Song et al., 2021) on ``t`` in ``[0, 1]``.

Forward process ``dx = f(x, t) dt + g(t) dw``; its marginal given clean data ``x0`` is
``N(mean_coefficient(t) * x0, std(t)^2 I)``. Times are tensors of shape ``(batch,)``.
"""

from __future__ import annotations

import abc
import math
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["SDE", "VESDE", "VPSDE", "broadcast_to", "sde_from_config"]

_Positive = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]


def broadcast_to(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample ``values`` of shape ``(batch,)`` reshaped to broadcast against ``like``."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class VPSDEConfig(_Config):
    kind: Literal["vp"] = "vp"
    beta_min: _Positive = 0.1
    beta_max: _Positive = 20.0

    @model_validator(mode="after")
    def _ordered(self) -> VPSDEConfig:
        if self.beta_max <= self.beta_min:
            raise ValueError(f"beta_max={self.beta_max} must exceed beta_min={self.beta_min}")
        return self


class VESDEConfig(_Config):
    kind: Literal["ve"] = "ve"
    sigma_min: _Positive = 0.01
    sigma_max: _Positive = 50.0

    @model_validator(mode="after")
    def _ordered(self) -> VESDEConfig:
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max={self.sigma_max} must exceed sigma_min={self.sigma_min}")
        return self


class SDE(abc.ABC):
    """A forward diffusion with a Gaussian marginal; subclasses define the schedule."""

    kind: ClassVar[str]

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """Plain-data configuration; :func:`sde_from_config` rebuilds the SDE from it."""

    @abc.abstractmethod
    def mean_coefficient(self, t: torch.Tensor) -> torch.Tensor:
        """``m(t)`` with ``E[x_t | x0] = m(t) x0``."""

    @abc.abstractmethod
    def std(self, t: torch.Tensor) -> torch.Tensor:
        """Standard deviation of ``x_t`` given ``x0``."""

    @abc.abstractmethod
    def coefficients(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(drift f(x, t), diffusion g(t))``; ``g`` has shape ``(batch,)``."""

    @abc.abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the prior ``N(0, s^2 I)`` that ``x_1`` approximately follows."""

    def langevin_alpha(self, t: torch.Tensor, dt: float) -> torch.Tensor:
        """Step-size factor of the Langevin corrector at ``t`` (1 unless the SDE shrinks)."""
        return torch.ones_like(t)

    def perturb(self, x0: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, std)`` for clean ``x0``, times ``t`` and standard normal ``noise``."""
        std = broadcast_to(self.std(t), x0)
        return broadcast_to(self.mean_coefficient(t), x0) * x0 + std * noise, std

    def prior_sample(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """A draw from the prior, on the generator's device."""
        return self.prior_std() * torch.randn(shape, generator=generator,
                                              device=generator.device)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SDE) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.config().items())))

    def __repr__(self) -> str:
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "kind")
        return f"{type(self).__name__}({arguments})"


class VPSDE(SDE):
    """Variance preserving: ``dx = -beta(t)/2 x dt + sqrt(beta(t)) dw``, with ``beta`` linear
    from ``beta_min`` to ``beta_max``; unit-variance data keeps unit variance."""

    kind = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        self._config = VPSDEConfig(beta_min=beta_min, beta_max=beta_max)
        self.beta_min, self.beta_max = self._config.beta_min, self._config.beta_max

    def config(self) -> dict[str, Any]:
        return self._config.model_dump()

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _log_mean_coefficient(self, t: torch.Tensor) -> torch.Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def mean_coefficient(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self._log_mean_coefficient(t))

    def std(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self._log_mean_coefficient(t)))

    def coefficients(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        beta = self.beta(t)
        return -0.5 * broadcast_to(beta, x) * x, torch.sqrt(beta)

    def prior_std(self) -> float:
        return 1.0

    def langevin_alpha(self, t: torch.Tensor, dt: float) -> torch.Tensor:
        # exp(-beta dt): the discrete 1 - beta dt of Song et al. for small steps, and positive
        # for coarse ones (where 1 - beta dt would make the step size negative)
        return torch.exp(-self.beta(t) * abs(dt))


class VESDE(SDE):
    """Variance exploding: ``dx = sqrt(d sigma(t)^2 / dt) dw`` with ``sigma`` geometric from
    ``sigma_min`` to ``sigma_max``; the mean stays ``x0``."""

    kind = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        self._config = VESDEConfig(sigma_min=sigma_min, sigma_max=sigma_max)
        self.sigma_min, self.sigma_max = self._config.sigma_min, self._config.sigma_max

    def config(self) -> dict[str, Any]:
        return self._config.model_dump()

    def mean_coefficient(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)

    def std(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def coefficients(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_ratio = math.log(self.sigma_max / self.sigma_min)
        return torch.zeros_like(x), self.std(t) * math.sqrt(2.0 * log_ratio)

    def prior_std(self) -> float:
        return self.sigma_max


_KINDS: dict[str, type[SDE]] = {"vp": VPSDE, "ve": VESDE}


def sde_from_config(config: dict[str, Any]) -> SDE:
    """The SDE that :meth:`SDE.config` described."""
    arguments = dict(config)
    kind = arguments.pop("kind", None)
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown SDE kind {kind!r}: expected one of {sorted(_KINDS)}")
    return cls(**arguments)
