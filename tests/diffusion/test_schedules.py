"""Schedules and the discrete denoiser, against diffusers' schedulers and closed-form identities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from t2i.diffusion.denoisers import DiscreteDenoiser
from t2i.diffusion.schedules import (
    DiscreteSchedule,
    karras_sigmas,
    make_alphas_cumprod,
    make_betas,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
)
from t2i.errors import ConfigError

SCHEDULES = [("linear", 0.0001, 0.02), ("scaled_linear", 0.00085, 0.012), ("squaredcos_cap_v2", 0.0001, 0.02)]


@pytest.mark.parametrize(("schedule", "start", "end"), SCHEDULES)
def test_betas_and_alphas_cumprod_match_diffusers_exactly(schedule, start, end):
    reference = DDIMScheduler(beta_schedule=schedule, beta_start=start, beta_end=end)
    assert torch.equal(make_betas(schedule, 1000, start, end), reference.betas)
    assert torch.equal(make_alphas_cumprod(schedule, 1000, start, end), reference.alphas_cumprod)


def test_unknown_beta_schedule_names_the_key():
    with pytest.raises(ConfigError, match="beta_schedule.*cosine"):
        make_betas("cosine")


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 10, 50])
def test_timestep_spacing_matches_diffusers(spacing, steps):
    ddim = DDIMScheduler(timestep_spacing=spacing, steps_offset=1)
    ddim.set_timesteps(steps)
    ours = spaced_timesteps(spacing, steps, 1000, steps_offset=1)
    np.testing.assert_array_equal(ours, ddim.timesteps.numpy())
    euler = EulerDiscreteScheduler(timestep_spacing=spacing, steps_offset=1)
    euler.set_timesteps(steps)
    ours = spaced_timesteps(spacing, steps, 1000, steps_offset=1, round_linspace=False)
    np.testing.assert_allclose(ours, euler.timesteps.numpy(), rtol=0, atol=1e-4)


def test_bad_step_count_and_spacing_raise_config_errors():
    with pytest.raises(ConfigError, match="steps"):
        spaced_timesteps("leading", 0)
    with pytest.raises(ConfigError, match="timestep_spacing"):
        spaced_timesteps("uniform", 10)


def test_karras_sigmas_endpoints_and_rho_spacing():
    sigmas = karras_sigmas(12, sigma_min=0.03, sigma_max=14.6, rho=7.0)
    assert sigmas.shape == (12,)
    assert sigmas[0].item() == pytest.approx(14.6, rel=1e-12)
    assert sigmas[-1].item() == pytest.approx(0.03, rel=1e-12)
    # Eq. 5 of Karras et al.: sigma^(1/rho) is evenly spaced.
    steps = torch.diff(sigmas ** (1 / 7))
    torch.testing.assert_close(steps, steps[:1].expand_as(steps), rtol=1e-10, atol=1e-12)


def _denoiser(prediction_type: str, model) -> DiscreteDenoiser:
    return DiscreteDenoiser(model, DiscreteSchedule(), prediction_type)


def test_sigma_to_t_inverts_the_table_and_interpolates_log_sigma():
    den = _denoiser("epsilon", lambda x, t: x)
    table = sigmas_from_alphas_cumprod(make_alphas_cumprod())
    t = torch.tensor([0.0, 1.0, 500.0, 999.0])
    torch.testing.assert_close(den.sigma_to_t(table[t.long()]), t.double(), rtol=0, atol=1e-9)
    midpoint = (table[10].log() + table[11].log()).div(2).exp()
    assert den.sigma_to_t(midpoint.reshape(1)).item() == pytest.approx(10.5, abs=1e-9)
    t_frac = torch.tensor([3.25, 640.7])
    torch.testing.assert_close(den.sigma_to_t(den.t_to_sigma(t_frac)), t_frac.double(), rtol=0, atol=1e-9)
    assert (den.sigma_min, den.sigma_max) == (table[0].item(), table[-1].item())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "eps", "v", "x0"])
def test_denoiser_recovers_x0_from_a_perfect_model(prediction_type):
    """A model that outputs the true eps / v / x0 for x = x0 + sigma eps must give back x0 exactly."""
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    s = sigma.reshape(-1, 1, 1, 1)
    alpha, sigma_vp = 1 / (1 + s**2).sqrt(), s / (1 + s**2).sqrt()
    seen = {}

    def model(x_in, t):
        seen["x_in"], seen["t"] = x_in, t
        target = {"eps": eps, "v": alpha * eps - sigma_vp * x0, "x0": x0}
        kind = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}.get(prediction_type, prediction_type)
        return target[kind]

    den = _denoiser(prediction_type, model)
    torch.testing.assert_close(den(x0 + s * eps, sigma, {}), x0)
    torch.testing.assert_close(seen["x_in"], alpha * x0 + sigma_vp * eps)  # the VP-scaled training input
    torch.testing.assert_close(seen["t"], den.sigma_to_t(sigma))


def test_denoiser_passes_cond_through():
    got = {}

    def model(x, t, context=None, context_mask=None):
        got.update(context=context, context_mask=context_mask)
        return torch.zeros_like(x)

    ctx, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    _denoiser("epsilon", model)(
        torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), {"context": ctx, "context_mask": mask}
    )
    assert got["context"] is ctx and got["context_mask"] is mask


def test_unknown_prediction_type_raises():
    with pytest.raises(ConfigError, match="'flow' is not one of eps, v, x0"):
        _denoiser("flow", lambda x, t: x)
