"""The Euler family on the probability-flow ODE: Euler and Heun with optional churn (Karras et al. 2022, Alg. 2),
and Euler ancestral (k-diffusion's `sample_euler_ancestral`)."""

from __future__ import annotations

import torch

from t2i.diffusion.samplers.core import Churn, ancestral_step, churned_ode_loop, euler_step
from t2i.diffusion.samplers.registry import SamplerRun, sampler


@sampler("euler")
def sample_euler(
    run: SamplerRun, x: torch.Tensor, sigmas: torch.Tensor, *, s_churn: float = 0.0, s_tmin: float = 0.0,
    s_tmax: float = float("inf"), s_noise: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """Euler steps of the probability-flow ODE, with optional churn (Karras et al. 2022, Alg. 2)."""
    return churned_ode_loop(run, x, sigmas, Churn(s_churn, s_tmin, s_tmax, s_noise), second_order=False)


@sampler("heun")
def sample_heun(
    run: SamplerRun, x: torch.Tensor, sigmas: torch.Tensor, *, s_churn: float = 0.0, s_tmin: float = 0.0,
    s_tmax: float = float("inf"), s_noise: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """Heun's second-order method with optional churn: the deterministic and stochastic samplers of Karras et al.
    2022 (Alg. 1 and 2; EDM's sampler). n steps take 2n - 1 model evaluations when the last sigma is 0 (that step
    stays Euler). s_churn = 0 is deterministic and draws no random numbers."""
    return churned_ode_loop(run, x, sigmas, Churn(s_churn, s_tmin, s_tmax, s_noise), second_order=True)


@sampler("euler_ancestral")
def sample_euler_ancestral(
    run: SamplerRun, x: torch.Tensor, sigmas: torch.Tensor, *, eta: float = 1.0, s_noise: float = 1.0
) -> torch.Tensor:
    """Euler step to sigma_down, then fresh noise of std sigma_up (k-diffusion `sample_euler_ancestral`)."""
    for i, sigma, sigma_next in run.steps(sigmas):
        denoised = run.denoise.step(i, x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = euler_step(x, sigma, sigma_down, denoised)
        if sigma_next > 0:
            x = run.add_noise(x, sigma_up, s_noise)
    return x
