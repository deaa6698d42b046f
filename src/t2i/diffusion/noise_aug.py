"""Noise-conditioning augmentation of a super-resolution stage's low-res input (Ho et al. 2021, "Cascaded
Diffusion Models"; Saharia et al. 2022, "Imagen", sec. 2.5), following NeMo's recipe.

The low-res image is noised with its own level, put on the scale the backbone sees for its main input, and the
level is handed to the backbone as `aug_cond` (embedded separately from the main time):

- `EDM`: sigma_aug drawn from the training log-normal ln(sigma) ~ N(p_mean, p_std^2);
  x_aug = c_in(sigma_aug) (x_low + sigma_aug n) with c_in = 1 / sqrt(sigma^2 + sigma_data^2);
  aug_cond = c_noise(sigma_aug) = ln(sigma_aug) / 4.
- `DDPM`: t_aug ~ U(0, max_level) on the stage's log-SNR schedule; x_aug = alpha x_low + sigma_vp n;
  aug_cond = the log-SNR lambda(t_aug) (or t_aug with time_cond="t"), encoded like the main time condition.

Training draws the level per sample (NeMo) or once per batch; sampling uses a fixed level (sigma_aug = 0.002 under
EDM, t_aug = 0 under DDPM unless a stage sets another).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from t2i.diffusion.denoisers import TIME_CONDS
from t2i.diffusion.losses import sample_lognormal_sigmas
from t2i.diffusion.schedules import LogSNRSchedule, vp_coefficients
from t2i.diffusion.tensors import append_dims, noise_like
from t2i.errors import ConfigError, InvalidInputError

AUG_KINDS = ("EDM", "DDPM")
DEFAULT_SAMPLE_LEVEL = {"EDM": 0.002, "DDPM": 0.0}
COSINE = LogSNRSchedule("cosine")


def _kind(kind: str) -> str:
    name = kind.upper()
    if name not in AUG_KINDS:
        raise ConfigError(f"model.preconditioning_type: {kind!r} is not one of {', '.join(AUG_KINDS)}")
    return name


def noise_low_res(
    x_low: torch.Tensor,
    level: torch.Tensor,
    kind: str = "EDM",
    generator: torch.Generator | None = None,
    *,
    sigma_data: float = 0.5,
    noise_schedule: LogSNRSchedule = COSINE,
    time_cond: str = "logsnr",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise x_low (B, C, h, w) at per-sample levels (B,) (sigma_aug for EDM, t_aug for DDPM).

    Returns (x_aug (B, C, h, w) on the backbone's input scale, aug_cond (B,) float32).
    """
    kind = _kind(kind)
    level = level.to(device=x_low.device, dtype=torch.float32)
    noise = noise_like(x_low, generator)
    if kind == "EDM":
        sigma = append_dims(level, x_low.ndim)
        c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
        return (c_in * (x_low + sigma * noise)).to(x_low.dtype), level.log() / 4
    if time_cond not in TIME_CONDS:
        raise ConfigError(f"time_cond: {time_cond!r} is not one of {', '.join(TIME_CONDS)}")
    logsnr = noise_schedule.logsnr(level)
    alpha, sigma_vp = (append_dims(c, x_low.ndim) for c in vp_coefficients(logsnr))
    x_aug = (alpha * x_low + sigma_vp * noise).to(x_low.dtype)
    return x_aug, logsnr if time_cond == "logsnr" else level


LEVEL_OPTIONS = ("p_mean", "p_std", "max_level")


def sample_aug_levels(
    batch: int,
    kind: str = "EDM",
    generator: torch.Generator | None = None,
    per_sample: bool = True,
    *,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    max_level: float = 1.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training augmentation levels (batch,) float32: EDM sigma_aug ~ lognormal(p_mean, p_std), DDPM
    t_aug ~ U(0, max_level); with per_sample False one draw is shared by the whole batch."""
    draws = batch if per_sample else 1
    if _kind(kind) == "EDM":
        levels = sample_lognormal_sigmas(draws, p_mean, p_std, generator, device)
    else:
        gen_device = generator.device if generator is not None else torch.device(device)
        levels = (torch.rand(draws, generator=generator, device=gen_device) * max_level).to(device)
    return levels.expand(batch)


def augment_low_res(
    x_low: torch.Tensor,
    kind: str = "EDM",
    generator: torch.Generator | None = None,
    per_sample: bool = True,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-time augmentation at random levels. x_low (B, C, h, w) -> (x_aug (B, C, h, w), aug_cond (B,)).

    `options`: the level distribution of `sample_aug_levels` (p_mean, p_std, max_level) and the `noise_low_res`
    encoding (sigma_data, noise_schedule, time_cond)."""
    level_options = {name: options.pop(name) for name in LEVEL_OPTIONS if name in options}
    levels = sample_aug_levels(x_low.shape[0], kind, generator, per_sample, device=x_low.device, **level_options)
    return noise_low_res(x_low, levels, kind, generator, **options)


def fixed_augment(
    x_low: torch.Tensor,
    level: float | None = None,
    kind: str = "EDM",
    generator: torch.Generator | None = None,
    **encoding: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling-time augmentation at one fixed level (default: sigma_aug 0.002 under EDM, t_aug 0 under DDPM).
    x_low (B, C, h, w) -> (x_aug (B, C, h, w), aug_cond (B,)); `encoding` as for `augment_low_res`."""
    kind = _kind(kind)
    level = DEFAULT_SAMPLE_LEVEL[kind] if level is None else float(level)
    if kind == "EDM" and not level > 0:
        raise InvalidInputError(f"aug_level: {level!r}; expected sigma_aug > 0 under EDM (e.g. 0.002)")
    if kind == "DDPM" and not 0 <= level <= 1:
        raise InvalidInputError(f"aug_level: {level!r}; expected a time t_aug in [0, 1] under DDPM")
    levels = torch.full((x_low.shape[0],), level, dtype=torch.float32)
    return noise_low_res(x_low, levels, kind, generator, **encoding)


def upsample_low_res(x_low: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of x_low (B, C, h, w) to `size`, clamped back to [-1, 1] (bicubic overshoots)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x_low.shape[-2:]) == size:
        return x_low.clamp(-1, 1)
    wide = x_low.float() if x_low.dtype in (torch.float16, torch.bfloat16) else x_low
    out = F.interpolate(wide, size=size, mode="bicubic", align_corners=False)
    return out.clamp(-1, 1).to(x_low.dtype)


__all__ = [
    "AUG_KINDS",
    "DEFAULT_SAMPLE_LEVEL",
    "augment_low_res",
    "fixed_augment",
    "noise_low_res",
    "sample_aug_levels",
    "upsample_low_res",
]
