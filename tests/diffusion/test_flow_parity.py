"""Parity with diffusers' flow-matching schedulers: our FlowSchedule grids against `set_timesteps`, and our plan +
sampler + FlowDenoiser against `FlowMatchEulerDiscreteScheduler` / `FlowMatchHeunDiscreteScheduler` driven step by
step on the same toy velocity model and the same noise, with a fixed shift and with Flux's dynamic shifting."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from t2i.diffusion.denoisers import FlowDenoiser
from t2i.diffusion.plans import make_plan
from t2i.diffusion.schedules import FlowSchedule, flux_mu, flux_sampling_times, image_seq_len
from t2i.errors import ConfigError

FLUX_DEV = {  # FLUX.1-dev's scheduler_config.json
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
SCHNELL = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
MU = flux_mu(image_seq_len(64, 64))  # a 512 px image: 1024 tokens


class ToyVelocity(torch.nn.Module):
    """A fixed random conv net plus the velocity of N(0, 1) data, smooth in t; float64 inside."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1).double().requires_grad_(False)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.double().reshape(-1, 1, 1, 1)
        zd = z.double()
        v = (2 * t - 1) / ((1 - t) ** 2 + t**2) * zd + 0.3 * torch.tanh(self.conv(zd)) * (1 + torch.sin(3 * t))
        return v.to(z.dtype)


MODEL = ToyVelocity()


def noise(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)


def run_diffusers(config: dict, steps: int, z: torch.Tensor, mu=None, sigmas=None) -> torch.Tensor:
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    if config["_class_name"] == "FlowMatchHeunDiscreteScheduler":
        scheduler.set_timesteps(steps)
        if sigmas is not None:  # Heun has no dynamic shifting: lay the Euler scheduler's grid out its way
            grid = torch.as_tensor(sigmas, dtype=torch.float32)
            scheduler.sigmas = torch.cat([grid[:1], grid[1:-1].repeat_interleave(2), grid[-1:]])
            scheduler.timesteps = scheduler.sigmas[:-1] * 1000
    else:
        scheduler.set_timesteps(steps, sigmas=sigmas, mu=mu)
    for t in scheduler.timesteps:
        z = scheduler.step(MODEL(z, (t / 1000).expand(z.shape[0])), t, z).prev_sample
    return z


def run_ours(sampler: str, config: dict, steps: int, z: torch.Tensor, mu=None, times=None) -> torch.Tensor:
    plan = make_plan(sampler, config, steps, mu=mu, times=times)
    return plan.sample(FlowDenoiser(MODEL), z)


@pytest.mark.parametrize(
    ("config", "times", "mu"),
    [
        (FLUX_DEV, "flux", MU),  # what FluxPipeline asks for: its own times, shifted with mu
        (FLUX_DEV, None, MU),  # the scheduler's own grid, dynamic shift
        (SD3, None, None),  # fixed shift 3, applied twice as diffusers does
        (SCHNELL, "flux", None),
        ({**SD3, "shift_terminal": 0.1}, None, None),
        ({**SD3, "use_karras_sigmas": True}, None, None),
    ],
)
def test_grids_match_set_timesteps(config, times, mu):
    steps = 9
    grid_times = flux_sampling_times(steps) if times == "flux" else None
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(steps, sigmas=grid_times, mu=mu)
    schedule = FlowSchedule.from_scheduler_config(config)
    ours = make_plan("euler", config, steps, mu=mu, times=grid_times).sigmas
    if not config.get("use_karras_sigmas"):
        torch.testing.assert_close(
            schedule.sampling_times(steps, mu, grid_times, config.get("shift_terminal")),
            scheduler.sigmas.double(), rtol=0, atol=0,
        )
    torch.testing.assert_close((ours / (1 + ours)).float(), scheduler.sigmas, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    ("config", "times", "mu"),
    [(FLUX_DEV, "flux", MU), (FLUX_DEV, None, 0.9), (SD3, None, None), (SCHNELL, "flux", None)],
    ids=["flux-dynamic", "scheduler-grid-dynamic", "sd3-fixed-shift", "schnell-no-shift"],
)
@pytest.mark.parametrize("steps", [1, 4, 12])
def test_flow_euler_matches_flow_match_euler(config, times, mu, steps):
    grid_times = flux_sampling_times(steps) if times == "flux" else None
    z = noise()
    expected = run_diffusers(config, steps, z, mu=mu, sigmas=grid_times)
    actual = run_ours("euler", config, steps, z, mu=mu, times=grid_times)
    assert expected.abs().max() < 10
    torch.testing.assert_close(actual, expected.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed-shift", "dynamic-shift"])
@pytest.mark.parametrize("steps", [2, 6])
def test_flow_heun_matches_flow_match_heun(dynamic, steps):
    heun = {"_class_name": "FlowMatchHeunDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    z = noise()
    if dynamic:
        grid_times = flux_sampling_times(steps)
        grid = FlowSchedule.from_scheduler_config(FLUX_DEV).sampling_times(steps, MU, grid_times)
        expected = run_diffusers(heun, steps, z, sigmas=grid)
        actual = run_ours("heun", FLUX_DEV, steps, z, mu=MU, times=grid_times)
    else:
        expected = run_diffusers(heun, steps, z)
        actual = run_ours("heun", heun, steps, z)
    torch.testing.assert_close(actual, expected.double(), rtol=0, atol=1e-6)


def test_float32_sampling_matches_too():
    """From t = 1 (sigma 1e10) in float32: the VE Euler step stays exact."""
    z = noise(torch.float32)
    expected = run_diffusers(FLUX_DEV, 8, z, mu=MU, sigmas=flux_sampling_times(8))
    actual = run_ours("euler", FLUX_DEV, 8, z, mu=MU, times=flux_sampling_times(8))
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_dynamic_shifting_needs_mu_and_heun_has_none():
    with pytest.raises(Exception, match="mu"):
        make_plan("euler", FLUX_DEV, 4)
    with pytest.raises(ConfigError, match="use_dynamic_shifting"):
        make_plan("heun", {**FLUX_DEV, "_class_name": "FlowMatchHeunDiscreteScheduler"}, 4, mu=MU)
    with pytest.raises(ConfigError, match="stochastic_sampling"):
        make_plan("euler", {**SD3, "stochastic_sampling": True}, 4)


def test_mu_is_diffusers_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for tokens in (16, 256, 1024, 4096, 9000):
        assert flux_mu(tokens) == pytest.approx(calculate_shift(tokens), abs=1e-12)
    assert np.isclose(flux_mu(256), 0.5) and np.isclose(flux_mu(4096), 1.15)
