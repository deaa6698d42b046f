"""Rectified flow on the denoiser contract: the sigma <-> t map, FlowDenoiser on Gaussian data (whose velocity,
x0 estimate and ODE map are known in closed form), every sampler through the flow plans, and the training loss
(SD3's densities and weights against diffusers' training utilities, the velocity target by hand)."""

from __future__ import annotations

import math

import pytest
import torch

from t2i.diffusion.denoisers import FlowDenoiser
from t2i.diffusion.losses import FlowMatchingLoss, flow_loss_weight, sample_flow_times
from t2i.diffusion.plans import make_plan
from t2i.diffusion.schedules import (
    FLOW_SIGMA_AT_ONE,
    FlowSchedule,
    flow_sigma_to_t,
    flow_t_to_sigma,
    flux_sampling_times,
    shift_times,
    time_shift,
)
from t2i.errors import ConfigError, InvalidInputError

MU, S = 0.7, 0.5  # data x0 ~ N(MU, S^2) in every coordinate


def gaussian_velocity(z: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
    """E[eps - x0 | z_t] for z_t = (1 - t) x0 + t eps, x0 ~ N(MU, S^2), eps ~ N(0, 1) (jointly Gaussian)."""
    t = t.double().reshape(-1, *([1] * (z.ndim - 1)))
    var = (1 - t) ** 2 * S**2 + t**2
    centred = z.double() - (1 - t) * MU
    x0 = MU + (1 - t) * S**2 / var * centred
    eps = t / var * centred
    return (eps - x0).to(z.dtype)


def ve_gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s2 = sigma.double().reshape(-1, *([1] * (x.ndim - 1))) ** 2
    return MU + S**2 / (S**2 + s2) * (x - MU)


def test_sigma_and_t_map_both_ways_exactly():
    t = torch.tensor([0.0, 1e-4, 0.25, 0.5, 0.9, 0.999999], dtype=torch.float64)
    sigma = flow_t_to_sigma(t)
    torch.testing.assert_close(sigma, t / (1 - t), rtol=1e-15, atol=0)
    torch.testing.assert_close(flow_sigma_to_t(sigma), t, rtol=1e-15, atol=1e-16)
    assert float(flow_t_to_sigma(1.0)) == FLOW_SIGMA_AT_ONE
    assert float(flow_sigma_to_t(FLOW_SIGMA_AT_ONE).float()) == 1.0  # float32 rounds t back to exactly 1
    denoiser = FlowDenoiser(gaussian_velocity, t_min=0.001)
    assert denoiser.sigma_min == pytest.approx(0.001 / 0.999)
    assert denoiser.sigma_max == FLOW_SIGMA_AT_ONE


@pytest.mark.parametrize("t", [0.05, 0.3, 0.7, 0.95, 1.0])
def test_flow_denoiser_is_the_ve_denoiser_of_the_same_data(t):
    """x0 = z - t v with z = x / (1 + sigma) equals the VE-scale posterior mean at sigma = t / (1 - t)."""
    sigma = flow_t_to_sigma(torch.full((3,), t))
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * (1 + sigma[0])
    ours = FlowDenoiser(gaussian_velocity)(x, sigma)
    torch.testing.assert_close(ours, ve_gaussian_denoiser(x, sigma), rtol=1e-9, atol=1e-9)


def exact_map(eps: torch.Tensor) -> torch.Tensor:
    """The flow ODE from z_1 = eps to t = 0 for Gaussian data: x0 = MU + S eps, sample by sample."""
    return MU + S * eps


FLUX = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": True}
# max |error| to the exact map at 60 steps on Flux's grid (measured: euler 0.068, ddim 0.066, flow_heun 4.9e-3,
# dpmpp_2m 0.0145, lms 2.1e-3, plms 2.7e-3; the last three start at the capped t = 0.999)
DETERMINISTIC = {"euler": 0.1, "heun": 8e-3, "dpmpp_2m": 0.02, "lms": 4e-3, "ddim": 0.1, "plms": 4e-3}


@pytest.mark.parametrize("sampler", list(DETERMINISTIC))
def test_samplers_follow_the_flow_ode_on_a_flow_plan(sampler):
    eps = torch.randn(64, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plan = make_plan(sampler, FLUX, 60, mu=0.8, times=flux_sampling_times(60))
    out = plan.sample(FlowDenoiser(gaussian_velocity), eps)
    exact = exact_map(eps)
    torch.testing.assert_close(out, exact, rtol=0, atol=DETERMINISTIC[sampler])
    assert out.mean().item() == pytest.approx(exact.mean().item(), abs=0.01)
    assert out.std().item() == pytest.approx(exact.std().item(), abs=0.025)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "ddpm"])
def test_stochastic_samplers_reach_the_data_distribution(sampler):
    eps = torch.randn(256, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plan = make_plan(sampler, FLUX, 200, mu=0.8, times=flux_sampling_times(200))
    out = plan.sample(FlowDenoiser(gaussian_velocity), eps, generator=torch.Generator().manual_seed(1))
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(S, abs=0.02)


def test_more_steps_reduce_the_euler_error():
    eps = torch.randn(8, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (5, 20, 80):
        plan = make_plan("euler", FLUX, steps, mu=0.8, times=flux_sampling_times(steps))
        errors.append((plan.sample(FlowDenoiser(gaussian_velocity), eps) - exact_map(eps)).abs().max().item())
    assert errors[0] > errors[1] > errors[2]


def test_shifts_are_the_papers_formulas():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(shift_times(t, 3.0), 3 * t / (1 + 2 * t))
    torch.testing.assert_close(time_shift(1.15, t), math.e**1.15 / (math.e**1.15 + 1 / t - 1))
    torch.testing.assert_close(time_shift(0.5, t, kind="linear"), 0.5 / (0.5 + 1 / t - 1))
    assert float(shift_times(torch.tensor(1.0), 3.0)) == 1.0 and float(time_shift(0.9, torch.tensor(1.0))) == 1.0
    with pytest.raises(InvalidInputError, match="mu"):
        FlowSchedule(use_dynamic_shifting=True).shifted(t)
    with pytest.raises(ConfigError, match="time_shift_type"):
        FlowSchedule(time_shift_type="cubic")


# ------------------------------------------------------------------------------------------ loss


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"])
def test_time_densities_and_weights_are_diffusers(scheme):
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    ours = sample_flow_times(512, scheme, 0.2, 1.1, 1.29, torch.Generator().manual_seed(3))
    theirs = compute_density_for_timestep_sampling(
        scheme, 512, logit_mean=0.2, logit_std=1.1, mode_scale=1.29, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(flow_loss_weight(ours, scheme), compute_loss_weighting_for_sd3(scheme, ours))


def test_logit_normal_concentrates_in_the_middle():
    u = sample_flow_times(20000, "logit_normal", generator=torch.Generator().manual_seed(0))
    logits = torch.logit(u.double())
    assert logits.mean().item() == pytest.approx(0.0, abs=0.03)
    assert logits.std().item() == pytest.approx(1.0, abs=0.03)


def test_loss_regresses_the_velocity_by_hand():
    """With fixed t and noise: z_t = (1 - t) x0 + t eps and the error of v against eps - x0, SD3-weighted."""
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.2, 0.5, 0.9])
    seen = {}

    def net(z, t_in, **cond):
        seen.update(z=z, t=t_in, cond=cond)
        return 0.5 * z

    loss = FlowMatchingLoss(weighting_scheme="cosmap")(FlowDenoiser(net), x0, {"pooled": 1}, t=t, noise=noise)
    z = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(seen["z"], z)
    torch.testing.assert_close(seen["t"], t)
    assert seen["cond"] == {"pooled": 1}
    weight = 2 / (math.pi * (1 - 2 * t + 2 * t**2))
    expected = weight * ((0.5 * z - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected)


def test_optimal_velocity_has_lower_loss_and_teacher_target():
    x0 = MU + S * torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    loss = FlowMatchingLoss(FlowSchedule(shift=3.0), weighting_scheme="logit_normal")
    best = loss(FlowDenoiser(gaussian_velocity), x0, generator=torch.Generator().manual_seed(1)).mean()
    worse = loss(FlowDenoiser(lambda z, t: 1.1 * gaussian_velocity(z, t)), x0,
                 generator=torch.Generator().manual_seed(1)).mean()  # fmt: skip
    assert best < worse
    # distillation onto itself is exactly zero
    teacher = FlowDenoiser(gaussian_velocity)
    zero = loss(FlowDenoiser(gaussian_velocity), x0, generator=torch.Generator().manual_seed(1), teacher=teacher)
    assert zero.abs().max().item() == 0


def test_dynamic_shift_follows_the_latent_size():
    """Flux's mu grows with the token count, so larger latents train at noisier times."""
    loss = FlowMatchingLoss(FlowSchedule(use_dynamic_shifting=True), weighting_scheme="none")
    small = loss.sample_times(torch.zeros(4096, 1, 32, 32), torch.Generator().manual_seed(0))  # 256 tokens
    large = loss.sample_times(torch.zeros(4096, 1, 128, 128), torch.Generator().manual_seed(0))  # 4096 tokens
    u = sample_flow_times(4096, generator=torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(small, time_shift(0.5, u).clamp(1e-3, 1).float())
    torch.testing.assert_close(large, time_shift(1.15, u).clamp(1e-3, 1).float())
    assert large.mean() > small.mean()
    with pytest.raises(ConfigError, match="weighting_scheme"):
        FlowMatchingLoss(weighting_scheme="lognorm")
