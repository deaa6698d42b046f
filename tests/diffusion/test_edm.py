"""The EDM formulation across its roles: preconditioning (`EDMDenoiser`), loss (`EDMLoss`), sigmas (`edm_sigmas`)
and the Heun sampler with churn, against the closed forms of Karras et al. 2022 and Gaussian data,
where the optimal denoiser is known: for x0 ~ N(MU, S^2), E[x0 | x0 + sigma n = x] = MU + S^2/(S^2+sigma^2)(x-MU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from t2i.config import build_config
from t2i.diffusion.denoisers import EDMDenoiser, edm_coefficients
from t2i.diffusion.losses import EDMLoss
from t2i.diffusion.samplers import SAMPLERS, get_sampler
from t2i.diffusion.samplers.euler import sample_heun
from t2i.diffusion.schedules import edm_sigmas
from t2i.errors import ConfigError, InvalidInputError

MU, S = 0.7, 0.5
SIGMA_DATA = 0.5
SIGMA_MAX = 80.0


def gaussian_x0(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s2 = sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2
    return MU + S**2 / (S**2 + s2) * (x - MU)


def ideal_net(x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
    """The F that makes EDMDenoiser the optimal Gaussian denoiser, recovering x and sigma from the paper's
    closed forms (sigma = exp(4 c_noise), x = x_in sqrt(sigma^2 + sd^2)), written without t2i code."""
    sigma = (4 * c_noise.double()).exp().reshape(-1, 1, 1, 1)
    x = x_in.double() * (sigma**2 + SIGMA_DATA**2).sqrt()
    c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
    c_out = sigma * SIGMA_DATA / (sigma**2 + SIGMA_DATA**2).sqrt()
    return ((gaussian_x0(x, sigma.flatten()) - c_skip * x) / c_out).to(x_in.dtype)


def start(n: int, seed: int = 0, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    z = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return MU + (S**2 + sigma_max**2) ** 0.5 * z


def exact_flow(x: torch.Tensor, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    return MU + (x - MU) * S / (S**2 + sigma_max**2) ** 0.5


# ------------------------------------------------------------------------------------------ preconditioning


@pytest.mark.parametrize("sigma", [0.002, 0.1, 0.5, 1.0, 80.0])
def test_coefficients_match_table_1(sigma):
    c = edm_coefficients(torch.tensor([sigma], dtype=torch.float64), 0.5)
    sd = 0.5
    assert c["c_skip"].item() == pytest.approx(sd**2 / (sigma**2 + sd**2), rel=1e-12)
    assert c["c_out"].item() == pytest.approx(sigma * sd / math.sqrt(sigma**2 + sd**2), rel=1e-12)
    assert c["c_in"].item() == pytest.approx(1 / math.sqrt(sigma**2 + sd**2), rel=1e-12)
    assert c["c_noise"].item() == pytest.approx(math.log(sigma) / 4, rel=1e-12)


def test_denoiser_feeds_net_c_in_x_and_c_noise_and_combines_with_c_skip_c_out():
    seen = {}

    def spy(x_in, c_noise, **cond):
        seen.update(x_in=x_in, c_noise=c_noise, cond=cond)
        return torch.full_like(x_in, 2.0)

    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.01, 1.0, 30.0], dtype=torch.float64)
    out = EDMDenoiser(spy, sigma_data=0.5)(x, sigma, {"context": "text"})
    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_in"], x / (s**2 + 0.25).sqrt())
    torch.testing.assert_close(seen["c_noise"], sigma.log() / 4)
    assert seen["cond"] == {"context": "text"}
    torch.testing.assert_close(out, 0.25 / (s**2 + 0.25) * x + 2.0 * s * 0.5 / (s**2 + 0.25).sqrt())


def test_ideal_F_reproduces_x0():
    """c_skip x + c_out F = x0 when F = (x0 - c_skip x) / c_out: the preconditioner loses nothing."""
    x0 = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.3, 5.0, 80.0], dtype=torch.float64)
    x = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(x0)

    def oracle(x_in, c_noise):
        s = (4 * c_noise).exp().reshape(-1, 1, 1, 1)
        x_rec = x_in * (s**2 + 0.25).sqrt()
        return (x0 - 0.25 / (s**2 + 0.25) * x_rec) / (s * 0.5 / (s**2 + 0.25).sqrt())

    torch.testing.assert_close(EDMDenoiser(oracle)(x, sigma), x0, rtol=1e-9, atol=1e-9)


def test_scalar_sigma_low_precision_and_defaults():
    denoiser = EDMDenoiser(lambda x_in, c_noise: torch.zeros_like(x_in))
    assert (denoiser.sigma_min, denoiser.sigma_max, denoiser.sigma_data) == (0.002, 80.0, 0.5)
    x = torch.ones(2, 1, 2, 2, dtype=torch.bfloat16)
    out = denoiser(x, 1.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), torch.full((2, 1, 2, 2), 0.25 / 1.25), atol=1e-2, rtol=0)


# ------------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("sigma", [0.01, 0.2, 1.0, 10.0])
def test_loss_weight_gives_unit_effective_weight_for_the_optimal_denoiser(sigma):
    """For x0 ~ N(0, sd^2) the optimal D is c_skip x (F = 0) and its x0 error has variance 1 / lambda(sigma), so
    lambda * E||D - x0||^2 = 1 (l2) and E|sqrt(lambda)(D - x0)| = sqrt(2 / pi) (l1) at every sigma."""
    gen = torch.Generator().manual_seed(0)
    x0 = SIGMA_DATA * torch.randn(16, 1, 32, 32, generator=gen, dtype=torch.float64)
    denoiser = EDMDenoiser(lambda x_in, c_noise: torch.zeros_like(x_in))
    sigmas = torch.full((16,), sigma, dtype=torch.float64)
    l2 = EDMLoss(loss_type="l2")(denoiser, x0, generator=gen, sigma=sigmas)
    l1 = EDMLoss(loss_type="l1")(denoiser, x0, generator=gen, sigma=sigmas)
    assert l2.shape == (16,)
    assert l2.mean().item() == pytest.approx(1.0, rel=0.03)
    assert l1.mean().item() == pytest.approx(math.sqrt(2 / math.pi), rel=0.03)


def test_loss_draws_lognormal_sigmas_and_penalises_a_worse_denoiser():
    gen = torch.Generator().manual_seed(1)
    x0 = SIGMA_DATA * torch.randn(4096, 1, 4, 4, generator=gen)
    optimal = EDMDenoiser(lambda x_in, c_noise: torch.zeros_like(x_in))
    biased = EDMDenoiser(lambda x_in, c_noise: torch.full_like(x_in, 0.3))
    loss = EDMLoss(p_mean=-1.2, p_std=1.2)
    sigmas = loss.sample_sigmas(x0, torch.Generator().manual_seed(2))
    assert sigmas.log().mean().item() == pytest.approx(-1.2, abs=0.06)
    assert sigmas.log().std().item() == pytest.approx(1.2, abs=0.06)
    losses = loss(optimal, x0, generator=torch.Generator().manual_seed(2))
    worse = loss(biased, x0, generator=torch.Generator().manual_seed(2))
    assert worse.mean() > losses.mean() + 0.05


def test_huber_loss_and_the_typed_config_section():
    denoiser, loss = EDMDenoiser(lambda x_in, c: torch.zeros_like(x_in)), EDMLoss(loss_type="huber", p_mean=0.0)
    x0 = torch.zeros(2, 1, 4, 4)
    losses = loss(denoiser, x0, sigma=torch.tensor([1.0, 2.0]), noise=torch.ones_like(x0))
    # D - x0 = c_skip * sigma; scaled by sqrt(lambda) it is sd / sqrt(sigma^2 + sd^2) < 1: huber = 0.5 r^2.
    r = 0.5 / torch.tensor([1.25, 4.25]).sqrt()
    torch.testing.assert_close(losses, 0.5 * r**2)
    model = {"kind": "imagen", "unet": {"embed_dim": 8, "image_size": 16, "text_embed_dim": 384}}
    section = build_config({"model": {**model, "preconditioning": {"loss_type": "huber"}}}).model.preconditioning
    assert section.kind == "EDM" and section.loss_type == "huber" and section.p_mean == -1.2
    with pytest.raises(ConfigError, match="model.preconditioning.timesteps: unknown key"):
        build_config({"model": {**model, "preconditioning": {"timesteps": 10}}})
    with pytest.raises(ConfigError, match="loss_type"):
        EDMLoss(loss_type="l3")


# ------------------------------------------------------------------------------------------------- sigmas


def test_edm_sigmas_follow_eq_5():
    steps, smin, smax, rho = 18, 0.002, 80.0, 7.0
    sigmas = edm_sigmas(steps, smin, smax, rho).numpy()
    i = np.arange(steps)
    reference = (smax ** (1 / rho) + i / (steps - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    assert sigmas.shape == (steps + 1,) and sigmas[-1] == 0
    np.testing.assert_allclose(sigmas[:-1], reference, rtol=1e-12)
    assert sigmas[0] == pytest.approx(smax) and sigmas[-2] == pytest.approx(smin)
    np.testing.assert_allclose(
        np.diff(sigmas[:-1] ** (1 / rho)), (smin ** (1 / rho) - smax ** (1 / rho)) / 17
    )
    with pytest.raises(InvalidInputError):
        edm_sigmas(0)


# ------------------------------------------------------------------------------------------------ sampling


def test_edm_heun_is_the_one_heun_sampler():
    assert get_sampler("heun") is sample_heun and "edm_heun" not in SAMPLERS


def test_edm_heun_follows_the_exact_probability_flow_and_uses_2n_minus_1_evaluations():
    calls = []

    def counted(x_in, c_noise):
        calls.append(1)
        return ideal_net(x_in, c_noise)

    x = start(64)
    out = sample_heun(EDMDenoiser(counted), x, edm_sigmas(100))
    torch.testing.assert_close(out, exact_flow(x), rtol=0, atol=5e-3)
    assert out.mean().item() == pytest.approx(MU, abs=0.02) and out.std().item() == pytest.approx(S, abs=0.02)
    assert len(calls) == 2 * 100 - 1


def test_edm_heun_is_second_order():
    x = start(8)
    errors = [
        (sample_heun(EDMDenoiser(ideal_net), x, edm_sigmas(n)) - exact_flow(x)).abs().max()
        for n in (8, 16)
    ]
    assert errors[1] < errors[0] / 3


def test_edm_heun_with_churn_matches_the_data_and_leaves_the_ode_path():
    x = start(256)
    sigmas = edm_sigmas(64)
    options = {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}
    out = sample_heun(
        EDMDenoiser(ideal_net), x, sigmas, generator=torch.Generator().manual_seed(3), **options
    )
    assert out.mean().item() == pytest.approx(MU, abs=0.02) and out.std().item() == pytest.approx(S, abs=0.02)
    correlation = torch.corrcoef(torch.stack([exact_flow(x).flatten(), out.flatten()]))[0, 1]
    assert correlation < 0.99
    again = sample_heun(EDMDenoiser(ideal_net), x, sigmas, generator=torch.Generator().manual_seed(3), **options)
    torch.testing.assert_close(out, again, rtol=0, atol=0)


def test_dpmpp_2m_from_the_registry_works_on_an_edm_denoiser():
    x = start(64)
    out = get_sampler("dpmpp_2m")(EDMDenoiser(ideal_net), x.float(), edm_sigmas(100))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact_flow(x), rtol=0, atol=5e-3)


def test_callback_and_float32():
    seen = []
    x = start(2).float()
    sample_heun(
        EDMDenoiser(ideal_net), x, edm_sigmas(5), callback=lambda i, s, x_, d: seen.append((i, x_.dtype))
    )
    assert seen == [(i, torch.float32) for i in range(5)]
