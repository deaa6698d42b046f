"""Discrete noise schedules: betas, alpha_bar, VE sigmas, inference timestep grids and Karras sigmas.

Conventions. A discrete model is trained on `x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps` for integer
`t in [0, T)`. Samplers work in the variance-exploding scale `x = x_t / sqrt(alpha_bar_t) = x0 + sigma_t eps` with
`sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)` (Karras et al. 2022, "Elucidating the design space", sec. 2).

Betas and alpha_bar are computed in float32 exactly as diffusers does, so a model trained with diffusers (or
CompVis) sees the same numbers here; derived sigmas are float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from t2i.errors import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]


def cosine_alpha_bar(t: float) -> float:
    """Improved-DDPM cosine alpha_bar(t) for t in [0, 1] (Nichol & Dhariwal 2021, eq. 17, s = 0.008)."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def make_betas(
    beta_schedule: str,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    trained_betas: Sequence[float] | None = None,
) -> torch.Tensor:
    """Betas (T,) float32 for a named schedule.

    `linear`: evenly spaced betas; `scaled_linear` (Stable Diffusion): evenly spaced sqrt(beta), squared;
    `squaredcos_cap_v2`: betas discretising the cosine alpha_bar, capped at 0.999.
    """
    if trained_betas is not None:
        return torch.tensor(list(trained_betas), dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        root = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32)
        return root**2
    if beta_schedule == "squaredcos_cap_v2":
        steps = num_train_timesteps
        betas = [
            min(1 - cosine_alpha_bar((i + 1) / steps) / cosine_alpha_bar(i / steps), 0.999)
            for i in range(steps)
        ]
        return torch.tensor(betas, dtype=torch.float32)
    raise ConfigError(
        f"beta_schedule: unknown value {beta_schedule!r}; expected one of {', '.join(BETA_SCHEDULES)}"
    )


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), (T,) in the dtype of `betas`."""
    return torch.cumprod(1.0 - betas, dim=0)


def make_alphas_cumprod(
    beta_schedule: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    trained_betas: Sequence[float] | None = None,
) -> torch.Tensor:
    """alpha_bar (T,) float32 for a named beta schedule (defaults: Stable Diffusion)."""
    betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas)
    return alphas_cumprod_from_betas(betas)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """VE sigmas (T,) float64: sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), increasing in t."""
    ac = alphas_cumprod.double()
    return ((1 - ac) / ac).sqrt()


def alpha_bar_from_sigma(sigma: torch.Tensor | float) -> torch.Tensor:
    """Inverse of `sigmas_from_alphas_cumprod`: alpha_bar = 1 / (1 + sigma^2)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return 1.0 / (1.0 + sigma**2)


def spaced_timesteps(
    spacing: str,
    steps: int,
    num_train_timesteps: int = 1000,
    steps_offset: int = 0,
    round_linspace: bool = True,
) -> np.ndarray:
    """Descending inference timesteps (steps,) float64, as diffusers' `set_timesteps` lays them out.

    `leading`: multiples of T // steps from 0, plus `steps_offset`; `trailing`: T - 1 downwards in steps of T / steps
    (rounded); `linspace`: `steps` evenly spaced points of [0, T - 1], rounded to integers for DDIM/DDPM/PNDM
    (`round_linspace=True`) and kept fractional by the Euler/Heun/LMS schedulers.
    """
    if steps < 1 or steps > num_train_timesteps:
        raise ConfigError(f"steps: got {steps}; expected an integer in [1, {num_train_timesteps}]")
    if spacing == "linspace":
        grid = np.linspace(0, num_train_timesteps - 1, steps)
        if round_linspace:
            return grid.round()[::-1].astype(np.float64)
        return grid.astype(np.float32)[::-1].astype(np.float64)
    if spacing == "leading":
        ratio = num_train_timesteps // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        ratio = num_train_timesteps / steps
        return np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.float64) - 1
    raise ConfigError(
        f"timestep_spacing: unknown value {spacing!r}; expected one of {', '.join(TIMESTEP_SPACINGS)}"
    )


def interpolate_sigmas(timesteps: np.ndarray | torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Sigma at (possibly fractional) timesteps by linear interpolation of the (T,) sigma table, float64."""
    table = sigmas.double().cpu().numpy()
    values = np.interp(np.asarray(timesteps, dtype=np.float64), np.arange(len(table)), table)
    return torch.from_numpy(values)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.

    Returns (steps,) float64 descending from sigma_max to sigma_min (no trailing zero).
    """
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    max_inv_rho = sigma_max ** (1 / rho)
    min_inv_rho = sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """Append a final sigma of 0 (the clean sample) to a (n,) schedule."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])
