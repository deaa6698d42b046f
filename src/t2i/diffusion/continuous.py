"""Continuous-time DDPM on a log-SNR schedule (Kingma et al. 2021, "Variational Diffusion Models"; the Imagen
formulation of NeMo's `preconditioning_type: DDPM` and lucidrains/imagen-pytorch).

A schedule maps time t in [0, 1] to the log signal-to-noise ratio lambda(t), decreasing in t. The VP forward
process is `z_t = alpha x0 + sigma_vp eps` with alpha^2 = sigmoid(lambda), sigma_vp^2 = sigmoid(-lambda). On the
VE scale of the denoiser contract (`x = z_t / alpha = x0 + sigma eps`) that is sigma^2 = exp(-lambda), so

    sigma <-> lambda = -2 ln(sigma) <-> t = lambda^-1(lambda).

Schedules (as NeMo and imagen-pytorch define them):
- `linear`: lambda(t) = -ln(expm1(1e-4 + 10 t^2)), the continuous limit of DDPM's linear betas 1e-4..0.02;
- `cosine`: lambda(t) = -ln(max(tan^2(theta), 1e-5)), theta = (t + s) / (1 + s) * pi / 2, s = 0.008 (the
  alpha-cosine schedule of Nichol & Dhariwal; the floor caps the log-SNR at ln(1e5)).

The network is called as `net(z_t, time_cond, **cond)`. What it is conditioned on (`time_cond`) is, by default and
as in NeMo, the log-SNR lambda(t) (`time_cond="logsnr"`); `time_cond="t"` passes t itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from t2i.diffusion.edm import LOSS_TYPES, append_dims, regression_loss
from t2i.diffusion.samplers import Callback, Denoiser, StepDenoiser, noise_like, register_sampler, sigma_steps
from t2i.errors import ConfigError, InvalidInputError

NOISE_SCHEDULES = ("linear", "cosine")
PRED_OBJECTIVES = ("noise", "x_start", "v")
TIME_CONDS = ("logsnr", "t")
DDPM_CONFIG_KEYS = ("loss_type", "pred_objective", "noise_schedule", "timesteps")
_COSINE_S = 0.008
_COSINE_TAN2_FLOOR = 1e-5


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


# ------------------------------------------------------------------------------------------------ schedules


@dataclass(frozen=True)
class LogSNRSchedule:
    """A named log-SNR schedule lambda(t) on t in [0, 1] with its inverse. Evaluated in the dtype of t."""

    name: str

    def __post_init__(self) -> None:
        _check_choice("model.preconditioning.noise_schedule", self.name, NOISE_SCHEDULES)

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """lambda(t), same shape and dtype as t (t is clamped to [0, 1])."""
        t = t.clamp(0, 1)
        if self.name == "linear":
            return -torch.special.expm1(1e-4 + 10 * t**2).log()
        theta = (t + _COSINE_S) / (1 + _COSINE_S) * (math.pi / 2)
        tan2 = torch.cos(theta) ** -2 - 1
        return -tan2.clamp(min=_COSINE_TAN2_FLOOR).log()

    def t_from_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        """Inverse of `logsnr`, clamped to [0, 1]; same shape and dtype as logsnr."""
        if self.name == "linear":
            # expm1(1e-4 + 10 t^2) = exp(-lambda)  <=>  1e-4 + 10 t^2 = softplus(-lambda)
            return ((F.softplus(-logsnr) - 1e-4) / 10).clamp(min=0).sqrt().clamp(max=1)
        theta = torch.atan((-logsnr / 2).exp())
        return (theta * (2 / math.pi) * (1 + _COSINE_S) - _COSINE_S).clamp(0, 1)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """VE noise level sigma(t) = exp(-lambda(t) / 2), float64."""
        return (-self.logsnr(t).double() / 2).exp()

    def t_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """t (float64) whose VE noise level is sigma."""
        return self.t_from_logsnr(-2 * sigma.double().log())


def get_schedule(noise_schedule: str | LogSNRSchedule) -> LogSNRSchedule:
    """A LogSNRSchedule from its name (`linear` | `cosine`), or the schedule itself."""
    return noise_schedule if isinstance(noise_schedule, LogSNRSchedule) else LogSNRSchedule(noise_schedule)


def vp_coefficients(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma_vp) = (sqrt(sigmoid(lambda)), sqrt(sigmoid(-lambda))), shaped like logsnr."""
    return logsnr.sigmoid().sqrt(), (-logsnr).sigmoid().sqrt()


def continuous_sigmas(
    steps: int, noise_schedule: str | LogSNRSchedule = "cosine", *, final_zero: bool = True
) -> torch.Tensor:
    """(steps + 1,) float64 decreasing VE sigmas at t = 1, 1 - 1/steps, ..., 0 (NeMo's sampling grid).

    The times are float32 as in NeMo, so the first level is the one NeMo's sampler starts from. With
    `final_zero` the last level (t = 0, the schedule's sigma_min) is replaced by 0, so the sample ends clean after
    the same `steps` model evaluations; without it the grid is exactly NeMo's, whose last step stops at t = 0.
    """
    if not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(
            f"steps: got {steps!r}; expected an integer >= 1 (continuous_sigmas(steps, noise_schedule))"
        )
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)
    sigmas = get_schedule(noise_schedule).sigma(times)
    if final_zero:
        sigmas[-1] = 0.0
    return sigmas


# ------------------------------------------------------------------------------------------------ denoiser


def _x0_from_prediction(
    out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, pred_objective: str
) -> torch.Tensor:
    """x0 on the VE scale from the network output; x (VE) and sigma broadcastable to x."""
    if pred_objective == "noise":
        return x - sigma * out
    if pred_objective == "v":
        # v = alpha eps - sigma_vp x0 (Salimans & Ho 2022) with alpha = 1 / sqrt(1 + sigma^2) on the VE scale.
        return x / (1 + sigma**2) - out * sigma / (1 + sigma**2).sqrt()
    return out


class ContinuousDDPMDenoiser(nn.Module):
    """A continuous-time DDPM network under the denoiser contract D(x, sigma, cond) -> x0.

    Args:
        net: backbone `net(z_t (B,C,H,W), time_cond (B,), **cond) -> prediction (B,C,H,W)`, where z_t is the VP
            sample x / sqrt(1 + sigma^2) and time_cond the log-SNR (default) or t.
        noise_schedule: `linear` | `cosine` (or a LogSNRSchedule).
        pred_objective: what the network predicts: `noise` (eps), `x_start` (x0) or `v`.
        time_cond: `logsnr` (NeMo) or `t`.
    """

    def __init__(
        self,
        net: Callable[..., torch.Tensor],
        noise_schedule: str | LogSNRSchedule = "cosine",
        pred_objective: str = "noise",
        time_cond: str = "logsnr",
    ) -> None:
        super().__init__()
        _check_choice("model.preconditioning.pred_objective", pred_objective, PRED_OBJECTIVES)
        _check_choice("time_cond", time_cond, TIME_CONDS)
        self.net = net
        self.schedule = get_schedule(noise_schedule)
        self.pred_objective = pred_objective
        self.time_cond = time_cond

    @property
    def sigma_min(self) -> float:
        return float(self.schedule.sigma(torch.tensor(0.0)))

    @property
    def sigma_max(self) -> float:
        return float(self.schedule.sigma(torch.tensor(1.0)))

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous time t in [0, 1] (float64) of a VE noise level."""
        return self.schedule.t_from_sigma(torch.as_tensor(sigma))

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """VE noise level (float64) at time t."""
        return self.schedule.sigma(torch.as_tensor(t, dtype=torch.float64))

    def condition(self, logsnr: torch.Tensor) -> torch.Tensor:
        """What the network is conditioned on for a log-SNR: the log-SNR itself or its time t."""
        return logsnr if self.time_cond == "logsnr" else self.schedule.t_from_logsnr(logsnr)

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict[str, Any] | None = None
    ) -> torch.Tensor:
        """x (B,C,H,W) on the VE scale, sigma (B,) or scalar -> x0_hat (B,C,H,W) in x's dtype."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float64)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        logsnr = -2 * sigma.log()
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        s = append_dims(sigma, x.ndim).to(wide)
        z_t = x.to(wide) / (1 + s**2).sqrt()
        out = self.net(z_t.to(x.dtype), self.condition(logsnr).to(wide), **(cond or {}))
        return _x0_from_prediction(out.to(wide), x.to(wide), s, self.pred_objective).to(x.dtype)


# ------------------------------------------------------------------------------------------------- training


class ContinuousDDPMLoss:
    """Continuous-time DDPM loss: t ~ U(0, 1) per sample, z_t = alpha x0 + sigma_vp eps, the network regresses
    eps (`noise`), x0 (`x_start`) or v = alpha eps - sigma_vp x0 (`v`) with an unweighted l1 / l2 / huber error
    (NeMo's `ContinousDDPMPrecond.compute_loss`)."""

    def __init__(
        self,
        noise_schedule: str | LogSNRSchedule = "cosine",
        pred_objective: str = "noise",
        loss_type: str = "l2",
        time_cond: str = "logsnr",
    ) -> None:
        _check_choice("model.preconditioning.loss_type", loss_type, LOSS_TYPES)
        _check_choice("model.preconditioning.pred_objective", pred_objective, PRED_OBJECTIVES)
        _check_choice("time_cond", time_cond, TIME_CONDS)
        self.schedule = get_schedule(noise_schedule)
        self.pred_objective, self.loss_type, self.time_cond = pred_objective, loss_type, time_cond

    def target(self, x0: torch.Tensor, noise: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """The regression target (B, ...) for x0, eps and lambda (B,)."""
        if self.pred_objective == "noise":
            return noise
        if self.pred_objective == "x_start":
            return x0
        alpha, sigma_vp = (append_dims(c, x0.ndim).to(x0.dtype) for c in vp_coefficients(logsnr))
        return alpha * noise - sigma_vp * x0

    def __call__(
        self,
        net: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        cond: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses (B,) and the times t (B,) used. `net` is the raw backbone, or a
        ContinuousDDPMDenoiser whose backbone is then trained; `t` / `noise` override the random draws."""
        time_cond_kind = self.time_cond
        if isinstance(net, ContinuousDDPMDenoiser):
            net, time_cond_kind = net.net, net.time_cond
        if t is None:
            device = generator.device if generator is not None else x0.device
            t = torch.rand(x0.shape[0], generator=generator, device=device)
        t = t.to(x0.device, torch.float32)
        noise = noise_like(x0, generator) if noise is None else noise
        logsnr = self.schedule.logsnr(t)
        alpha, sigma_vp = (append_dims(c, x0.ndim).to(x0.dtype) for c in vp_coefficients(logsnr))
        z_t = alpha * x0 + sigma_vp * noise
        time_cond = logsnr if time_cond_kind == "logsnr" else t
        pred = net(z_t, time_cond, **(cond or {}))
        return regression_loss(pred, self.target(x0, noise, logsnr), self.loss_type), t


def continuous_ddpm_from_config(
    net: Callable[..., torch.Tensor], preconditioning: Mapping[str, Any] | None = None
) -> tuple[ContinuousDDPMDenoiser, ContinuousDDPMLoss, int]:
    """(denoiser, loss, sampling steps) from NeMo's `model.preconditioning` under `preconditioning_type: DDPM`
    (keys loss_type, pred_objective, noise_schedule, timesteps; `timesteps` is the ancestral sampler's number of
    steps). Unknown keys raise ConfigError."""
    options = dict(preconditioning or {})
    unknown = sorted(set(options) - set(DDPM_CONFIG_KEYS))
    if unknown:
        raise ConfigError(
            f"model.preconditioning.{unknown[0]}: unknown key for DDPM; valid keys: {', '.join(DDPM_CONFIG_KEYS)}"
        )
    steps = options.get("timesteps", 1000)
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"model.preconditioning.timesteps: expected an integer >= 1, got {steps!r}")
    schedule = get_schedule(str(options.get("noise_schedule", "cosine")))
    objective = str(options.get("pred_objective", "noise"))
    loss = ContinuousDDPMLoss(schedule, objective, str(options.get("loss_type", "l2")))
    return ContinuousDDPMDenoiser(net, schedule, objective), loss, steps


# ------------------------------------------------------------------------------------------------- sampling


def _batch_float_sigma(sigma: float, x: torch.Tensor) -> torch.Tensor:
    return x.new_full((x.shape[0],), sigma)


@register_sampler("ddpm_continuous")
def sample_ddpm_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: dict[str, Any] | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling from the posterior q(x_s | x_t, x0_hat) between consecutive levels (NeMo's
    `DDPMSampler`; Kingma et al. 2021, eq. 33). With c = 1 - SNR_t / SNR_s = 1 - (sigma_s / sigma_t)^2 it reads,
    on the VE scale, mean = x0_hat + (sigma_s / sigma_t)^2 (x - x0_hat) and variance = sigma_s^2 c.

    x (B, ...) enters scaled by sigmas[0]; sigmas (N + 1,) decreasing (continuous_sigmas). As in NeMo the last
    step adds no noise.
    """
    # Python floats, so the posterior coefficients are taken in double precision whatever x's dtype
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).tolist()
    steps = len(sigmas) - 1
    denoise = StepDenoiser(denoiser, cond, callback, batch_sigma=_batch_float_sigma)
    for i, sigma, sigma_next in sigma_steps(sigmas, progress):
        # the callback contract passes sigma as a tensor
        denoised = denoise.step(i, x, torch.tensor(sigma), at=sigma)
        ratio2 = (sigma_next / sigma) ** 2
        x = denoised + ratio2 * (x - denoised)
        if i < steps - 1 and sigma_next > 0:
            x = x + sigma_next * math.sqrt(1 - ratio2) * noise_like(x, generator)
    return x
