"""Continuous-time DDPM: log-SNR schedules against their formulas, the sigma <-> t maps, the denoiser adapter and
loss on exact predictions, and the ancestral sampler against NeMo's VP posterior and on Gaussian data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from t2i.config import build_config
from t2i.diffusion.denoisers import ContinuousDDPMDenoiser
from t2i.diffusion.losses import ContinuousDDPMLoss
from t2i.diffusion.samplers import get_sampler
from t2i.diffusion.samplers.posterior import sample_ddpm_continuous as sample_ddpm_ancestral
from t2i.diffusion.schedules import LogSNRSchedule, continuous_sigmas
from t2i.errors import ConfigError, InvalidInputError

MU, S = 0.7, 0.5
SCHEDULES = ["linear", "cosine"]


def reference_logsnr(name: str, t: np.ndarray) -> np.ndarray:
    """The schedules as written in NeMo / imagen-pytorch, in numpy."""
    if name == "linear":
        return -np.log(np.expm1(1e-4 + 10 * t**2))
    tan2 = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** -2 - 1
    return -np.log(np.maximum(tan2, 1e-5))


def alpha_sigma(logsnr: np.ndarray | torch.Tensor):
    """VP coefficients from the log-SNR: alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)."""
    logsnr = torch.as_tensor(logsnr, dtype=torch.float64)
    return logsnr.sigmoid().sqrt(), (-logsnr).sigmoid().sqrt()


# ------------------------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("name", SCHEDULES)
def test_logsnr_matches_formula_and_decreases(name):
    t = np.linspace(0, 1, 2001)
    values = LogSNRSchedule(name).logsnr(torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(values, reference_logsnr(name, t), rtol=1e-10, atol=1e-10)
    assert np.all(np.diff(values) < 0)


def test_schedule_endpoints():
    linear, cosine = LogSNRSchedule("linear"), LogSNRSchedule("cosine")
    assert linear.logsnr(torch.tensor(0.0, dtype=torch.float64)).item() == pytest.approx(
        -math.log(math.expm1(1e-4))
    )
    assert linear.logsnr(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(-10.0, abs=1e-3)
    # cos(pi/2) underflows to ~1e-8 in float32: NeMo's sampler starts from log-SNR ~ -33.9 there.
    assert cosine.logsnr(torch.tensor(1.0)).item() == pytest.approx(-33.89, abs=0.05)
    with pytest.raises(ConfigError, match="noise_schedule"):
        LogSNRSchedule("sigmoid")


@pytest.mark.parametrize("name", SCHEDULES)
def test_sigma_t_maps_round_trip(name):
    denoiser = ContinuousDDPMDenoiser(lambda z, c: z, LogSNRSchedule(name))
    t = torch.linspace(0.001, 0.999, 500, dtype=torch.float64)
    sigma = denoiser.t_to_sigma(t)
    np.testing.assert_allclose(sigma.numpy(), np.exp(-reference_logsnr(name, t.numpy()) / 2), rtol=1e-10)
    torch.testing.assert_close(denoiser.sigma_to_t(sigma), t, rtol=0, atol=1e-9)
    torch.testing.assert_close(denoiser.t_to_sigma(denoiser.sigma_to_t(sigma)), sigma, rtol=1e-8, atol=0)
    assert denoiser.sigma_min == pytest.approx(float(sigma.min()), rel=0.2)
    assert denoiser.sigma_max > sigma.max()


# ------------------------------------------------------------------------------------------------ denoiser


@pytest.mark.parametrize("time_cond", ["logsnr", "t"])
def test_denoiser_feeds_net_the_vp_sample_and_its_time_condition(time_cond):
    seen = {}

    def spy(z, cond_t, **cond):
        seen.update(z=z, cond_t=cond_t, cond=cond)
        return torch.zeros_like(z)

    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    schedule = LogSNRSchedule("cosine")
    sigma = schedule.sigma(t)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    ContinuousDDPMDenoiser(spy, schedule, time_cond=time_cond)(x, sigma, {"x_low_res": 1})
    alpha, _ = alpha_sigma(reference_logsnr("cosine", t.numpy()))
    torch.testing.assert_close(seen["z"], x * alpha.reshape(-1, 1, 1, 1))
    expected = torch.from_numpy(reference_logsnr("cosine", t.numpy())) if time_cond == "logsnr" else t
    torch.testing.assert_close(seen["cond_t"], expected)
    assert seen["cond"] == {"x_low_res": 1}


@pytest.mark.parametrize("objective", ["noise", "x_start", "v"])
@pytest.mark.parametrize("name", SCHEDULES)
def test_exact_prediction_gives_x0(objective, name):
    """z_t = alpha x0 + sigma eps; a net returning the exact eps / x0 / v makes the denoiser return x0."""
    x0 = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([0.05, 0.4, 0.95], dtype=torch.float64)
    alpha, sigma_vp = (c.reshape(-1, 1, 1, 1) for c in alpha_sigma(reference_logsnr(name, t.numpy())))
    z_t = alpha * x0 + sigma_vp * eps
    target = {"noise": eps, "x_start": x0, "v": alpha * eps - sigma_vp * x0}[objective]
    denoiser = ContinuousDDPMDenoiser(lambda z, c: target, LogSNRSchedule(name), objective)
    out = denoiser(z_t / alpha, denoiser.t_to_sigma(t))
    torch.testing.assert_close(out, x0, rtol=1e-7, atol=1e-7)


# ------------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("objective", ["noise", "x_start", "v"])
def test_loss_is_zero_for_the_exact_prediction(objective):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 8, 8, generator=gen)
    eps = torch.randn(4, 1, 8, 8, generator=gen)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    alpha, sigma_vp = (
        c.reshape(-1, 1, 1, 1).float() for c in alpha_sigma(reference_logsnr("linear", t.double().numpy()))
    )
    seen = {}

    def exact(z, cond_t):
        seen.update(z=z, cond_t=cond_t)
        return {"noise": eps, "x_start": x0, "v": alpha * eps - sigma_vp * x0}[objective]

    denoiser = ContinuousDDPMDenoiser(exact, LogSNRSchedule("linear"), objective)
    losses = ContinuousDDPMLoss()(denoiser, x0, t=t, noise=eps)
    torch.testing.assert_close(losses, torch.zeros(4), atol=1e-10, rtol=0)
    torch.testing.assert_close(seen["z"], alpha * x0 + sigma_vp * eps)
    torch.testing.assert_close(
        seen["cond_t"].double(),
        torch.from_numpy(reference_logsnr("linear", t.double().numpy())),
        rtol=1e-5,
        atol=1e-5,
    )


def test_loss_draws_uniform_times_and_measures_the_error():
    x0 = torch.randn(2048, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    seen = {}

    def zero(z, c):
        seen["t"] = c
        return torch.zeros_like(z)

    denoiser = ContinuousDDPMDenoiser(zero, LogSNRSchedule("cosine"), "noise", time_cond="t")
    losses = ContinuousDDPMLoss("l2")(denoiser, x0, generator=torch.Generator().manual_seed(2))
    t = seen["t"]
    assert losses.shape == (2048,) and 0 <= t.min() and t.max() < 1
    assert t.mean().item() == pytest.approx(0.5, abs=0.02) and t.std().item() == pytest.approx(
        12**-0.5, abs=0.02
    )
    assert losses.mean().item() == pytest.approx(1.0, abs=0.03)  # E[eps^2] for a zero prediction
    l1 = ContinuousDDPMLoss("l1")(denoiser, x0, generator=torch.Generator().manual_seed(2))
    assert l1.mean().item() == pytest.approx(math.sqrt(2 / math.pi), abs=0.03)


def test_the_typed_config_section():
    model = {"kind": "imagen", "preconditioning_type": "DDPM",
             "unet": {"embed_dim": 8, "image_size": 16, "text_embed_dim": 384}}  # fmt: skip
    section = build_config(
        {"model": {**model, "preconditioning": {"loss_type": "l1", "pred_objective": "x_start",
                                                "noise_schedule": "linear", "timesteps": 250}}}
    ).model.preconditioning  # fmt: skip
    assert (section.kind, section.loss_type, section.pred_objective, section.timesteps) == ("DDPM", "l1", "x_start", 250)
    with pytest.raises(ConfigError, match="model.preconditioning.p_mean: unknown key"):
        build_config({"model": {**model, "preconditioning": {"p_mean": 0.0}}})
    with pytest.raises(ConfigError, match="pred_objective"):
        build_config({"model": {**model, "preconditioning": {"pred_objective": "eps"}}})
    with pytest.raises(ConfigError, match="timesteps"):
        build_config({"model": {**model, "preconditioning": {"timesteps": 0}}})


# ------------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("name", SCHEDULES)
def test_continuous_sigmas_are_the_log_snr_grid(name):
    steps = 10
    t = np.linspace(1, 0, steps + 1).astype(np.float32).astype(np.float64)
    expected = np.exp(-reference_logsnr(name, t) / 2)
    exact = continuous_sigmas(steps, LogSNRSchedule(name), final_zero=False).numpy()
    np.testing.assert_allclose(exact[1:], expected[1:], rtol=1e-4)  # evaluated in float32, as NeMo does
    clean = continuous_sigmas(steps, LogSNRSchedule(name))
    assert clean[-1] == 0 and torch.equal(clean[:-1], torch.from_numpy(exact[:-1]))
    assert np.all(np.diff(exact) < 0)
    with pytest.raises(InvalidInputError, match="steps"):
        continuous_sigmas(name, LogSNRSchedule(name))


def ideal_eps_net(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    """Exact eps prediction for x0 ~ N(MU, S^2): E[eps | z_t] from the optimal x0 on the VE scale."""
    sigma = (-logsnr.double() / 2).exp().reshape(-1, 1, 1, 1)
    x = z.double() * (1 + sigma**2).sqrt()
    x0 = MU + S**2 / (S**2 + sigma**2) * (x - MU)
    return ((x - x0) / sigma).to(z.dtype)


def nemo_reference_sampler(
    x0_fn, z: torch.Tensor, schedule: LogSNRSchedule, steps: int, gen: torch.Generator
):
    """NeMo's DDPMSampler loop in VP coordinates (q_posterior of Kingma et al. 2021, eq. 33), eps objective."""
    times = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        l, l_next = (schedule.logsnr(times[j]).double() for j in (i, i + 1))
        alpha, sigma = alpha_sigma(l)
        alpha_next, sigma_next = alpha_sigma(l_next)
        x_start = (z - sigma * ideal_eps_net(z, l.expand(z.shape[0]))) / alpha
        c = -torch.expm1(l - l_next)
        z = alpha_next * (z * (1 - c) / alpha + c * x_start)
        if i < steps - 1:
            z = z + (sigma_next**2 * c).sqrt() * torch.randn(z.shape, generator=gen, dtype=z.dtype)
    return z


def start(n: int, sigma_max: float, seed: int = 0) -> torch.Tensor:
    z = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return MU + (S**2 + sigma_max**2) ** 0.5 * z


@pytest.mark.parametrize("name", SCHEDULES)
def test_ancestral_sampler_matches_nemo_step_for_step(name):
    steps = 12
    sigmas = continuous_sigmas(steps, LogSNRSchedule(name), final_zero=False)
    x = start(4, float(sigmas[0]))
    denoiser = ContinuousDDPMDenoiser(ideal_eps_net, LogSNRSchedule(name))
    ours = sample_ddpm_ancestral(denoiser, x, sigmas, generator=torch.Generator().manual_seed(5))
    alpha0, _ = alpha_sigma(-2 * math.log(float(sigmas[0])))
    reference = nemo_reference_sampler(
        None, x * alpha0, LogSNRSchedule(name), steps, torch.Generator().manual_seed(5)
    )
    alpha_end, _ = alpha_sigma(-2 * math.log(float(sigmas[-1])))
    torch.testing.assert_close(ours * alpha_end, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", SCHEDULES)
def test_ancestral_sampler_reproduces_gaussian_data(name):
    sigmas = continuous_sigmas(250, LogSNRSchedule(name))
    x = start(256, float(sigmas[0]))
    out = get_sampler("ddpm_continuous")(
        ContinuousDDPMDenoiser(ideal_eps_net, LogSNRSchedule(name)), x, sigmas, generator=torch.Generator().manual_seed(1)
    )
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(S, abs=0.02)


def test_ancestral_sampler_float32_and_callback():
    sigmas = continuous_sigmas(6, LogSNRSchedule("linear"))
    calls = []
    out = sample_ddpm_ancestral(
        ContinuousDDPMDenoiser(ideal_eps_net, LogSNRSchedule("linear")),
        start(2, float(sigmas[0])).float(),
        sigmas,
        generator=torch.Generator().manual_seed(0),
        callback=lambda i, s, x_, d: calls.append(i),
    )
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and calls == list(range(6))
