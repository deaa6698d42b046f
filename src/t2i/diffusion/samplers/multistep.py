"""Multistep samplers: linear multistep (LMS, Karras et al. 2022 / k-diffusion) and DPM-Solver++(2M) with its SDE
variant (Lu et al. 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from t2i.diffusion.samplers.core import to_d
from t2i.diffusion.samplers.registry import SamplerRun, sampler


def lms_coefficient(sigmas: Sequence[float], i: int, order: int, j: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial through sigma_i..sigma_{i-order+1}
    that is 1 at sigma_{i-j} (linear multistep, Karras et al. 2022 / k-diffusion `linear_multistep_coeff`)."""
    nodes = [float(sigmas[i - k]) for k in range(order)]
    basis = np.polynomial.Polynomial([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            basis = basis * np.polynomial.Polynomial([-node, 1.0]) / (nodes[j] - node)
    antiderivative = basis.integ()
    return float(antiderivative(float(sigmas[i + 1])) - antiderivative(float(sigmas[i])))


@sampler("lms")
def sample_lms(
    run: SamplerRun,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    order: int = 4,
) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth in sigma) on the ODE derivatives, order up to `order`."""
    denoise = run.denoise
    sigma_list = sigmas.double().cpu().tolist()
    derivatives: list[torch.Tensor] = []
    for i, sigma, _ in run.steps(sigmas):
        denoised = denoise.step(i, x, sigma)
        derivatives = [to_d(x, sigma, denoised), *derivatives][:order]
        current_order = min(i + 1, order)
        coeffs = [lms_coefficient(sigma_list, i, current_order, j) for j in range(current_order)]
        x = x + sum(c * d for c, d in zip(coeffs, derivatives))
    return x


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR on the VE scale: lambda = -log(sigma)."""
    return -sigma.log()


def _second_order_ready(old_denoised: torch.Tensor | None, i: int, n: int, euler_at_final: bool) -> bool:
    """Whether DPM-Solver++(2M) step i of n may use the previous x0: not on the first step, nor on the last one
    when `euler_at_final` asks for first order there."""
    return old_denoised is not None and not (euler_at_final and i == n - 1)


@sampler("dpmpp_2m")
def sample_dpmpp_2m(
    run: SamplerRun,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    euler_at_final: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M), multistep second order in x0 (Lu et al. 2022, Alg. 2). First and final steps are first
    order (`euler_at_final` forces that for a final sigma > 0, as diffusers' `lower_order_final` does)."""
    denoise = run.denoise
    n = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in run.steps(sigmas):
        denoised = denoise.step(i, x, sigma)
        if sigma_next == 0:
            x = denoised
            continue
        h = _lambda(sigma_next) - _lambda(sigma)
        x0_estimate = denoised
        if _second_order_ready(old_denoised, i, n, euler_at_final):
            r = h_last / h
            x0_estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - torch.expm1(-h) * x0_estimate
        old_denoised, h_last = denoised, h
    return x


@sampler("dpmpp_2m_sde")
def sample_dpmpp_2m_sde(
    run: SamplerRun,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    euler_at_final: bool = False,
) -> torch.Tensor:
    """SDE variant of DPM-Solver++(2M) (Lu et al. 2022, sec. 5; midpoint form of k-diffusion and diffusers)."""
    denoise = run.denoise
    n = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in run.steps(sigmas):
        denoised = denoise.step(i, x, sigma)
        # drawn on every step, the last included, so the generator advances as in k-diffusion and diffusers
        noise = run.noise_like(x)
        if sigma_next == 0:
            x = denoised
            continue
        h = _lambda(sigma_next) - _lambda(sigma)
        eta_h = eta * h
        x = (sigma_next / sigma) * (-eta_h).exp() * x - torch.expm1(-h - eta_h) * denoised
        if _second_order_ready(old_denoised, i, n, euler_at_final):
            r = h_last / h
            x = x - 0.5 * torch.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
        if eta > 0:
            x = x + noise * sigma_next * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x
