"""The Euler family on the probability-flow ODE: Euler and Heun with optional churn (Karras et al. 2022, Alg. 2),
and Euler ancestral (k-diffusion's `sample_euler_ancestral`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from t2i.diffusion.samplers.core import (
    Callback,
    Churn,
    Denoiser,
    StepDenoiser,
    add_noise,
    ancestral_step,
    churned_ode_loop,
    euler_step,
    prepare_sigmas,
    sigma_steps,
)
from t2i.diffusion.samplers.registry import register_sampler
from t2i.diffusion.tensors import Generators


def _churned_sampler(second_order: bool, doc: str) -> Callable[..., torch.Tensor]:
    """A sampler running Karras et al.'s Alg. 2 loop with Euler (first order) or Heun (second order) steps."""

    def sample(
        denoiser: Denoiser,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        cond: dict | None = None,
        *,
        generator: Generators = None,
        callback: Callback | None = None,
        progress: bool = False,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
    ) -> torch.Tensor:
        denoise, churn = StepDenoiser(denoiser, cond, callback), Churn(s_churn, s_tmin, s_tmax, s_noise)
        sigmas = prepare_sigmas(x, sigmas)
        return churned_ode_loop(denoise, x, sigmas, churn, generator, progress, second_order=second_order)

    sample.__doc__ = doc
    return sample


sample_euler = register_sampler("euler")(
    _churned_sampler(False, "Euler steps of the probability-flow ODE, with optional churn (Karras et al. 2022, Alg. 2).")
)
sample_heun = register_sampler("heun")(
    _churned_sampler(
        True,
        "Heun's second-order method with optional churn: the deterministic and stochastic samplers of Karras et "
        "al. 2022 (Alg. 1 and 2; EDM's sampler). n steps take 2n - 1 model evaluations when the last sigma is 0 "
        "(that step stays Euler). s_churn = 0 is deterministic and draws no random numbers.",
    )
)


@register_sampler("euler_ancestral")
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: dict | None = None,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    progress: bool = False,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler step to sigma_down, then fresh noise of std sigma_up (k-diffusion `sample_euler_ancestral`)."""
    sigmas, denoise = prepare_sigmas(x, sigmas), StepDenoiser(denoiser, cond, callback)
    for i, sigma, sigma_next in sigma_steps(sigmas, progress):
        denoised = denoise.step(i, x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = euler_step(x, sigma, sigma_down, denoised)
        if sigma_next > 0:
            x = add_noise(x, sigma_up, generator, s_noise)
    return x
