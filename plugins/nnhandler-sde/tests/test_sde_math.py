"""The SDEs, the denoising score-matching data and loss, and the sampler, against closed forms."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from nnhandler_sde import (
    SDE,
    VESDE,
    VPSDE,
    DenoisingScoreMatchingLoss,
    EulerMaruyamaSampler,
    NoisedDataset,
    sde_from_config,
)
from nnhandler_sde.sde import broadcast_to
from pydantic import ValidationError
from torch.utils.data import DataLoader, TensorDataset

MEAN = torch.tensor([1.5, -0.5])
SPREAD = 0.3


def gaussian_score(sde: SDE) -> Any:
    """The exact score of ``p_t`` when the data are ``N(MEAN, SPREAD^2 I)``."""
    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m, s = broadcast_to(sde.mean_coefficient(t), x), broadcast_to(sde.std(t), x)
        return -(x - m * MEAN) / (m**2 * SPREAD**2 + s**2)
    return score


@given(beta_min=st.floats(0.01, 1.0), spread=st.floats(1.0, 30.0),
       t=st.floats(1e-4, 1.0))
def test_vp_sde_preserves_unit_variance(beta_min: float, spread: float, t: float) -> None:
    sde = VPSDE(beta_min, beta_min + spread)
    time = torch.tensor([t], dtype=torch.float64)
    assert float(sde.mean_coefficient(time) ** 2 + sde.std(time) ** 2) == pytest.approx(1.0)


@pytest.mark.parametrize("sde", [VPSDE(0.1, 5.0), VESDE(0.01, 3.0)], ids=["vp", "ve"])
def test_marginals_match_a_simulation_of_the_forward_sde(sde: SDE) -> None:
    generator = torch.Generator().manual_seed(0)
    n, steps, t_end = 4000, 100, 0.7
    x0 = torch.tensor([1.0, -2.0])
    x = x0.expand(n, 2).clone().double()
    dt = t_end / steps
    for i in range(steps):
        t = torch.full((n,), i * dt, dtype=torch.float64)
        drift, diffusion = sde.coefficients(x, t)
        x = x + drift * dt + broadcast_to(diffusion, x) * math.sqrt(dt) * torch.randn(
            x.shape, generator=generator, dtype=torch.float64)
    t_end_tensor = torch.tensor([t_end], dtype=torch.float64)
    expected_mean = float(sde.mean_coefficient(t_end_tensor)) * x0.double()
    expected_var = float(sde.std(t_end_tensor)) ** 2
    if isinstance(sde, VESDE):  # the VE marginal starts at sigma_min, the simulation at 0
        expected_var -= sde.sigma_min**2
    assert torch.allclose(x.mean(0), expected_mean, atol=0.05)
    assert torch.allclose(x.var(0), torch.full((2,), expected_var, dtype=torch.float64),
                          rtol=0.08)


@pytest.mark.parametrize("corrector_steps", [  # the corrector doubles the cost: not quick
    pytest.param(0, id="predictor"),
    pytest.param(1, id="predictor-corrector", marks=pytest.mark.slow)])
@pytest.mark.parametrize("sde", [VPSDE(), VESDE(0.01, 10.0)], ids=["vp", "ve"])
def test_sampler_with_the_exact_score_recovers_the_data(sde: SDE, corrector_steps: int) -> None:
    sampler = EulerMaruyamaSampler(steps=200, corrector_steps=corrector_steps)
    samples = sampler.sample(gaussian_score(sde), sde, (4000, 2),
                             torch.Generator().manual_seed(0))
    assert torch.allclose(samples.mean(0), MEAN, atol=0.05)
    assert torch.allclose(samples.std(0), torch.full((2,), SPREAD), rtol=0.07)


def test_sampler_draws_depend_only_on_the_generator_state() -> None:
    sde, sampler = VPSDE(), EulerMaruyamaSampler(steps=20, corrector_steps=1)
    generator = torch.Generator().manual_seed(5)
    saved = generator.get_state()
    first = sampler.sample(gaussian_score(sde), sde, (8, 2), generator)
    second = sampler.sample(gaussian_score(sde), sde, (8, 2), generator)
    generator.set_state(saved)
    again = sampler.sample(gaussian_score(sde), sde, (8, 2), generator)
    assert torch.equal(first, again) and not torch.equal(first, second)


def test_noised_dataset_items_are_consistent_perturbations() -> None:
    clean = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    sde = VPSDE()
    torch.manual_seed(0)
    (x_t, t), target = next(iter(DataLoader(NoisedDataset(TensorDataset(clean), sde),
                                            batch_size=64)))
    noise, std = target.unbind(1)
    assert x_t.shape == clean.shape and t.shape == (64,) and target.shape == (64, 2, 2)
    assert bool(((t >= 1e-5) & (t <= 1)).all())
    mean = broadcast_to(sde.mean_coefficient(t), clean) * clean
    assert torch.allclose(x_t, mean + std * noise, atol=1e-6)
    assert torch.allclose(std[:, 0], sde.std(t))
    (single_x, single_t), single_target = NoisedDataset(clean, sde)[3]  # a plain tensor dataset
    assert (single_x.shape, single_t.shape, single_target.shape) == ((2,), (), (2, 2))


def test_dsm_loss_is_the_weighted_denoising_error_and_the_true_score_minimises_it() -> None:
    loss = DenoisingScoreMatchingLoss()
    noise = torch.tensor([[1.0, -1.0]])
    std = torch.tensor([[0.5, 0.5]])
    target = torch.stack([noise, std], dim=1)
    assert float(loss(torch.tensor([[0.0, 0.0]]), target)) == pytest.approx(2.0)
    assert float(loss(-noise / std, target)) == 0.0
    sde = VPSDE()
    clean = MEAN + SPREAD * torch.randn(4096, 2, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    (x_t, t), target = next(iter(DataLoader(NoisedDataset(clean, sde), batch_size=4096)))
    true = float(loss(gaussian_score(sde)(x_t, t), target))
    assert true < float(loss(torch.zeros_like(x_t), target))
    assert true < float(loss(1.1 * gaussian_score(sde)(x_t, t), target))


def test_dsm_loss_rejects_a_target_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"target of shape \(4, 2\) does not fit"):
        DenoisingScoreMatchingLoss()(torch.zeros(4, 2), torch.zeros(4, 2))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: VPSDE(beta_min=-1.0), "beta_min"),
        (lambda: VPSDE(beta_min=2.0, beta_max=1.0), "must exceed beta_min"),
        (lambda: VESDE(sigma_min=0.0), "sigma_min"),
        (lambda: VESDE(sigma_min=5.0, sigma_max=5.0), "must exceed sigma_min"),
        (lambda: EulerMaruyamaSampler(steps=0), "steps"),
        (lambda: EulerMaruyamaSampler(eps=1.0), "eps"),
        (lambda: EulerMaruyamaSampler(corrector_steps=-1), "corrector_steps"),
        (lambda: EulerMaruyamaSampler(steps=10.0), "steps"),  # type: ignore[arg-type]
    ],
    ids=["vp-negative", "vp-order", "ve-zero", "ve-order", "steps", "eps", "corrector",
         "float-steps"],
)
def test_bad_configuration_is_a_validation_error(make: Any, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        make()


def test_sde_configuration_round_trips_and_unknown_kinds_are_refused() -> None:
    for sde in (VPSDE(0.2, 10.0), VESDE(0.02, 20.0)):
        assert sde_from_config(sde.config()) == sde
    with pytest.raises(ValueError, match="unknown SDE kind 'subvp'"):
        sde_from_config({"kind": "subvp"})
    with pytest.raises(ValueError, match="eps must lie in"):
        NoisedDataset(torch.zeros(3, 2), VPSDE(), eps=0.0)
