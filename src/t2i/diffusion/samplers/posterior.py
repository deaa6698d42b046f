"""Samplers of the posterior q(x_s | x_t, x0_hat): DDPM, DDIM, PLMS (on the discrete VP grids diffusers uses) and
the continuous-time DDPM ancestral sampler of NeMo's Imagen."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from t2i.diffusion.samplers.core import ancestral_step, landing_sigmas, to_d, vp_rescale
from t2i.diffusion.samplers.registry import SamplerRun, sampler


@sampler("ddim")
def sample_ddim(
    run: SamplerRun,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    sigmas_to: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_next = x0 + sqrt(s_to^2 - std^2) eps + std z, with std = eta * the DDPM
    posterior std. eta = 0 is deterministic (and equals an Euler step on the VE scale).

    `sigmas_to` (n,), optional: where each step lands when that differs from `sigmas[i + 1]` (diffusers'
    `t - T // steps` off the `leading` grid); the sample is then read at `sigmas[i + 1]` unchanged in VP scale.
    """
    denoise = run.denoise
    targets = landing_sigmas(x, sigmas, sigmas_to)
    for i, sigma, sigma_next in run.steps(sigmas):
        target = targets[i]
        denoised = denoise.step(i, x, sigma)
        eps = to_d(x, sigma, denoised)
        _, std = ancestral_step(sigma, target, eta)
        x = denoised + (target**2 - std**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            # diffusers' operand order (std * noise): half-precision CPU kernels round the two orders differently
            x = x + std * run.noise_like(x)
        x = vp_rescale(x, target, sigma_next)
    return x


@sampler("ddpm")
def sample_ddpm(
    run: SamplerRun,
    x: torch.Tensor,
    sigmas: torch.Tensor,
) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_s | x_t, x0_hat) with the `fixed_small` variance
    (Ho et al. 2020, eq. 7); on the VE scale the posterior mean is x0 + (sigma_s / sigma_t)^2 (x - x0)."""
    return sample_ddim.core(run, x, sigmas, eta=1.0)


def _to_v(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The v-prediction a v-model would have output: v = (eps - sigma x0) / sqrt(1 + sigma^2)."""
    return (to_d(x, sigma, denoised) - sigma * denoised) / (1 + sigma**2).sqrt()


def _v_to_eps(v: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return v / (1 + sigma**2).sqrt() + sigma * x / (1 + sigma**2)


def _plms_combine(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth combination of the newest-first model outputs (Liu et al. 2022, PNDM eq. 12)."""
    weights = {
        1: [1.0],
        2: [3 / 2, -1 / 2],
        3: [23 / 12, -16 / 12, 5 / 12],
        4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
    }
    return sum(w * out for w, out in zip(weights[len(outputs)], outputs))


@sampler("plms")
def sample_plms(
    run: SamplerRun,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    sigmas_to: Sequence[float] | torch.Tensor | None = None,
    sigma_correct_from: float | None = None,
    multistep_space: str = "eps",
) -> torch.Tensor:
    """Pseudo linear multistep (PLMS, Liu et al. 2022) with diffusers' `skip_prk_steps` warm-up: the first step is
    a predictor-corrector pair (average of the outputs at both ends), later steps combine up to 4 past outputs.
    Each update is a DDIM step with the combined eps, so n steps take n + 1 model evaluations.

    Options reproducing diffusers' PNDMScheduler exactly: `sigmas_to` (n,) landing sigma of each step (see
    `sample_ddim`); `sigma_correct_from` the sigma the corrector restarts from; `multistep_space="v"` combines the
    raw v outputs instead of eps, as that scheduler does for v-prediction models.
    """
    denoise = run.denoise
    n = len(sigmas) - 1
    targets = landing_sigmas(x, sigmas, sigmas_to)
    as_output = _to_v if multistep_space == "v" else to_d

    def ddim_jump(
        x_: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        eps = _v_to_eps(out, x_, sigma) if as_output is _to_v else out
        return x_ + (target - sigma) * eps

    history: list[torch.Tensor] = []
    for i, sigma, sigma_next in run.steps(sigmas):
        out = as_output(x, sigma, denoise.step(i, x, sigma))
        history = [out, *history][:4]
        if i == 0 and n > 1:
            x_pred = vp_rescale(ddim_jump(x, sigma, targets[0], out), targets[0], sigma_next)
            out_pred = as_output(x_pred, sigma_next, denoise(x_pred, sigma_next))
            start = sigma if sigma_correct_from is None else torch.as_tensor(sigma_correct_from).to(sigma)
            x_start = vp_rescale(x, sigma, start)
            x = ddim_jump(x_start, start, sigma_next, (out + out_pred) / 2)
            continue
        x = vp_rescale(ddim_jump(x, sigma, targets[i], _plms_combine(history)), targets[i], sigma_next)
    return x


@sampler("ddpm_continuous", prepare=False)
def sample_ddpm_continuous(
    run: SamplerRun,
    x: torch.Tensor,
    sigmas: torch.Tensor,
) -> torch.Tensor:
    """Ancestral sampling from the posterior between consecutive levels of a continuous-time grid (NeMo's
    `DDPMSampler`; Kingma et al. 2021, eq. 33). With c = 1 - SNR_t / SNR_s = 1 - (sigma_s / sigma_t)^2 it reads,
    on the VE scale, mean = x0_hat + (sigma_s / sigma_t)^2 (x - x0_hat) and variance = sigma_s^2 c: the DDPM
    posterior of `sample_ddpm`, except that, as in NeMo, the last step adds no noise even when the grid does not
    end at 0.

    x (B, ...) enters scaled by sigmas[0]; sigmas (N + 1,) decreasing (`continuous_sigmas`).
    """
    # Python floats, so the posterior coefficients are taken in double precision whatever x's dtype
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).tolist()
    steps = len(sigmas) - 1
    denoise = run.denoise
    for i, sigma, sigma_next in run.steps(sigmas):
        denoised = denoise.step(i, x, torch.tensor(sigma), at=torch.tensor(sigma, dtype=x.dtype))
        ratio2 = (sigma_next / sigma) ** 2
        x = denoised + ratio2 * (x - denoised)
        if i < steps - 1 and sigma_next > 0:
            x = x + sigma_next * math.sqrt(1 - ratio2) * run.noise_like(x)
    return x
