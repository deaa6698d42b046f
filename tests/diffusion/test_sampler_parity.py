"""Parity with diffusers' schedulers: our plan + sampler + DiscreteDenoiser against `set_timesteps` /
`scale_model_input` / `step` on the same toy model, Stable Diffusion's scheduler config and the same seed."""

from __future__ import annotations

import diffusers
import pytest
import torch

from t2i.diffusion.denoisers import DiscreteDenoiser
from t2i.diffusion.plans import default_sampler_for, make_plan, scheduler_config_for
from t2i.diffusion.schedules import DiscreteSchedule, make_alphas_cumprod
from t2i.errors import ConfigError, UnknownSamplerError

SD_CONFIG = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
}
ALPHAS_CUMPROD = make_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012).double()


class ToyModel(torch.nn.Module):
    """A fixed random conv net around the Gaussian-optimal eps, smooth in t, outputs in x's dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1).double()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.double().reshape(-1, 1, 1, 1)
        low = t.floor().long().clamp(max=998)
        alpha_bar = torch.lerp(ALPHAS_CUMPROD[low], ALPHAS_CUMPROD[low + 1], t - low)
        xd = x.double()
        out = (1 - alpha_bar).sqrt() * xd + 0.3 * torch.tanh(self.conv(xd)) * (1 + torch.sin(t / 300))
        return out.to(x.dtype)


torch.manual_seed(0)
MODEL = ToyModel().requires_grad_(False)


def run_diffusers(sampler: str, config: dict, steps: int, noise: torch.Tensor, seed: int) -> torch.Tensor:
    class_name, extra = scheduler_config_for(sampler)
    scheduler = getattr(diffusers, class_name).from_config({**config, **extra})
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = noise * scheduler.init_noise_sigma
    stochastic = sampler in ("euler_ancestral", "ddpm", "dpmpp_2m_sde")
    for t in scheduler.timesteps:
        out = MODEL(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))
        kwargs = {"generator": generator} if stochastic else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


def run_ours(sampler: str, config: dict, steps: int, noise: torch.Tensor, seed: int, karras: bool = False):
    plan = make_plan(sampler, config, steps, use_karras_sigmas=karras)
    denoiser = DiscreteDenoiser(
        MODEL, DiscreteSchedule.from_scheduler_config(config), config.get("prediction_type", "epsilon"),
        **plan.denoiser_options(),
    )
    return plan.sample(denoiser, noise, generator=torch.Generator().manual_seed(seed))


def noise_like(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)


DETERMINISTIC = ["ddim", "plms", "euler", "heun", "lms", "dpmpp_2m"]
# Same seed, same draws: diffusers' noise draws line up with ours one for one.
STOCHASTIC = ["euler_ancestral", "ddpm", "dpmpp_2m_sde"]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", DETERMINISTIC + STOCHASTIC)
def test_final_latents_match_diffusers(sampler, prediction_type, spacing):
    # 7 steps: trailing and linspace land off diffusers' `t - 1000 // 7` grid for DDIM / PNDM.
    config = {**SD_CONFIG, "prediction_type": prediction_type, "timestep_spacing": spacing}
    # diffusers draws SDE noise in float32 whatever the model dtype, so stochastic runs stay in float32.
    dtype = torch.float32 if sampler in STOCHASTIC else torch.float64
    noise = noise_like(dtype)
    expected = run_diffusers(sampler, config, 7, noise, seed=5)
    actual = run_ours(sampler, config, 7, noise, seed=5)
    assert expected.abs().max() < 10  # a meaningful scale for the 1e-4 tolerance
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("sampler", ["euler", "heun", "lms", "dpmpp_2m"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_karras_sigmas_match_diffusers(sampler, prediction_type):
    config = {**SD_CONFIG, "prediction_type": prediction_type, "use_karras_sigmas": True}
    noise = noise_like(torch.float64)
    expected = run_diffusers(sampler, config, 8, noise, seed=0)
    actual = run_ours(
        sampler, {k: v for k, v in config.items() if k != "use_karras_sigmas"}, 8, noise, 0, True
    )
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("config", "steps"),
    [
        ({"final_sigmas_type": "sigma_min"}, 6),  # lower_order_final with a non-zero last sigma
        ({"final_sigmas_type": "sigma_min"}, 16),  # no lower-order final step from 15 steps on
        ({"timestep_spacing": "trailing", "euler_at_final": True, "final_sigmas_type": "sigma_min"}, 20),
    ],
)
def test_dpm_solver_final_step_rules_match_diffusers(config, steps):
    config = {**SD_CONFIG, **config}
    noise = noise_like(torch.float64)
    torch.testing.assert_close(
        run_ours("dpmpp_2m", config, steps, noise, 0),
        run_diffusers("dpmpp_2m", config, steps, noise, 0),
        rtol=0,
        atol=1e-4,
    )


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_default_config_and_final_alpha(set_alpha_to_one):
    """SD's config has no timestep_spacing: DDIM then reads `leading`, as diffusers does."""
    config = {**SD_CONFIG, "set_alpha_to_one": set_alpha_to_one}
    plan = make_plan("ddim", config, 10)
    assert (plan.sigmas[-1].item() == 0) == set_alpha_to_one
    assert plan.final_scale == pytest.approx(float(ALPHAS_CUMPROD[0].sqrt()) if not set_alpha_to_one else 1.0)
    noise = noise_like(torch.float64)
    torch.testing.assert_close(
        run_ours("ddim", config, 10, noise, 0), run_diffusers("ddim", config, 10, noise, 0), rtol=0, atol=1e-4
    )


def test_euler_init_noise_sigma_depends_on_spacing():
    leading = make_plan("euler", {**SD_CONFIG, "timestep_spacing": "leading"}, 10)
    linspace = make_plan("euler", {**SD_CONFIG, "timestep_spacing": "linspace"}, 10)
    assert leading.init_noise_scale == pytest.approx((leading.sigmas[0].item() ** 2 + 1) ** 0.5)
    assert linspace.init_noise_scale == pytest.approx(linspace.sigmas[0].item())


def test_class_names_map_both_ways():
    for sampler in DETERMINISTIC + STOCHASTIC:
        class_name, extra = scheduler_config_for(sampler)
        assert default_sampler_for(class_name, extra) == sampler
    assert default_sampler_for("DPMSolverMultistepScheduler") == "dpmpp_2m"
    with pytest.raises(UnknownSamplerError, match="UniPCMultistepScheduler"):
        default_sampler_for("UniPCMultistepScheduler")


def test_unsupported_scheduler_options_raise():
    with pytest.raises(ConfigError, match="solver_order"):
        make_plan("dpmpp_2m", {**SD_CONFIG, "solver_order": 3}, 10)
    with pytest.raises(ConfigError, match="use_exponential_sigmas"):
        make_plan("euler", {**SD_CONFIG, "use_exponential_sigmas": True}, 10)
