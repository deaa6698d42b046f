"""Samplers on Gaussian data, where the optimal denoiser and the exact sampling map are known in closed form."""

from __future__ import annotations

import pytest
import torch

from t2i.diffusion.plans import make_plan
from t2i.diffusion.samplers import SAMPLERS, available_samplers, get_sampler, register_sampler
from t2i.diffusion.samplers.multistep import lms_coefficient
from t2i.diffusion.schedules import append_zero, karras_sigmas
from t2i.errors import UnknownSamplerError

MU, S = 0.7, 0.5  # data x0 ~ N(MU, S^2) in every coordinate
SIGMA_MAX = 80.0


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
    """E[x0 | x0 + sigma n = x] for x0 ~ N(MU, S^2): MU + S^2 / (S^2 + sigma^2) (x - MU)."""
    s2 = sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2
    return MU + S**2 / (S**2 + s2) * (x - MU)


def start(n: int, seed: int = 0) -> torch.Tensor:
    """Exact marginal at SIGMA_MAX: N(MU, S^2 + SIGMA_MAX^2), shaped (n, 1, 8, 8), float64."""
    z = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return MU + (S**2 + SIGMA_MAX**2) ** 0.5 * z


SIGMAS = append_zero(karras_sigmas(100, 0.002, SIGMA_MAX))
DETERMINISTIC = ["euler", "heun", "lms", "dpmpp_2m", "ddim", "plms"]
STOCHASTIC = ["euler_ancestral", "ddpm", "dpmpp_2m_sde"]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_follow_the_exact_probability_flow(name):
    """The PF-ODE maps x at SIGMA_MAX to MU + (x - MU) S / sqrt(S^2 + SIGMA_MAX^2), sample by sample."""
    x = start(64)
    out = get_sampler(name)(gaussian_denoiser, x, SIGMAS)
    exact = MU + (x - MU) * S / (S**2 + SIGMA_MAX**2) ** 0.5
    # First-order methods converge slowly; higher-order ones are measured to be ~20x closer at 100 steps.
    tolerance = {"euler": 0.08, "ddim": 0.08, "heun": 5e-3, "dpmpp_2m": 5e-3}.get(name, 2e-3)
    torch.testing.assert_close(out, exact, rtol=0, atol=tolerance)
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(S, abs=0.02)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_match_the_data_distribution(name):
    """Ancestral steps plug in E[x0|x] and so lose variance on coarse grids; they converge as steps grow."""
    x = start(256)
    sigmas = append_zero(karras_sigmas(400, 0.002, SIGMA_MAX))
    out = get_sampler(name)(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(1))
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(S, abs=0.02)
    # Fresh noise decorrelates output from input, unlike the ODE samplers.
    correlation = torch.corrcoef(torch.stack([x.flatten(), out.flatten()]))[0, 1]
    assert correlation < 0.9


@pytest.mark.parametrize("name", DETERMINISTIC[:4])
def test_more_steps_reduce_the_error(name):
    x = start(8)
    exact = MU + (x - MU) * S / (S**2 + SIGMA_MAX**2) ** 0.5
    errors = [
        (get_sampler(name)(gaussian_denoiser, x, append_zero(karras_sigmas(n, 0.002, SIGMA_MAX))) - exact)
        .abs()
        .max()
        for n in (5, 20)
    ]
    assert errors[1] < errors[0]


def test_ddim_with_eta_one_is_stochastic_and_eta_zero_is_not():
    x = start(4)
    a = get_sampler("ddim")(gaussian_denoiser, x, SIGMAS, generator=torch.Generator().manual_seed(0), eta=1.0)
    b = get_sampler("ddim")(gaussian_denoiser, x, SIGMAS, generator=torch.Generator().manual_seed(1), eta=1.0)
    c = get_sampler("ddim")(gaussian_denoiser, x, SIGMAS, generator=torch.Generator().manual_seed(1), eta=0.0)
    d = get_sampler("ddim")(gaussian_denoiser, x, SIGMAS, generator=torch.Generator().manual_seed(2), eta=0.0)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(c, d, rtol=0, atol=0)


@pytest.mark.parametrize("name", available_samplers())
def test_same_seed_reproduces_and_callback_sees_every_step(name):
    x = start(2)
    sigmas = append_zero(karras_sigmas(6, 0.1, SIGMA_MAX))
    calls = []
    runs = [
        get_sampler(name)(
            gaussian_denoiser,
            x,
            sigmas,
            generator=torch.Generator().manual_seed(3),
            callback=lambda i, sigma, x_, x0: calls.append((i, float(sigma), x0.shape)),
        )
        for _ in range(2)
    ]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert [c[0] for c in calls] == list(range(6)) * 2
    assert all(shape == x.shape for *_, shape in calls)


def test_progress_bar_runs(capsys):
    get_sampler("euler")(gaussian_denoiser, start(1), SIGMAS[-4:], progress=True)
    assert "3/3" in capsys.readouterr().err


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(UnknownSamplerError) as info:
        get_sampler("euler_a")
    message = str(info.value)
    assert "euler_a" in message and "dpmpp_2m" in message and "\n" not in message


def test_register_sampler_extends_the_registry():
    @register_sampler("_test_identity")
    def sample_identity(denoiser, x, sigmas, cond=None, **_):
        return x

    try:
        assert get_sampler("_test_identity") is sample_identity
        plan = make_plan("_test_identity", {}, 4)
        assert plan.sigmas.shape == (5,)
    finally:
        del SAMPLERS["_test_identity"]


def test_lms_coefficients_integrate_polynomials_exactly():
    """An order-k rule integrates any polynomial of degree < k in sigma exactly."""
    sigmas = [14.0, 9.0, 5.5, 2.0, 0.5]
    i, order = 3, 4
    nodes = [sigmas[i - j] for j in range(order)]
    estimate = sum(lms_coefficient(sigmas, i, order, j) * (3 * s**3 - s + 2) for j, s in enumerate(nodes))

    def antiderivative(s: float) -> float:
        return 0.75 * s**4 - 0.5 * s**2 + 2 * s

    exact = antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i])
    assert estimate == pytest.approx(exact, rel=1e-12)
