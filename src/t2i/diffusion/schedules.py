"""Noise schedules: the discrete beta schedule (`DiscreteSchedule`), the continuous log-SNR schedules of Imagen's
DDPM (`LogSNRSchedule`), inference timestep grids, and the Karras / EDM and log-SNR sampling sigmas.

Conventions. A discrete model is trained on `x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps` for integer
`t in [0, T)`. Samplers work in the variance-exploding scale `x = x_t / sqrt(alpha_bar_t) = x0 + sigma_t eps` with
`sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)` (Karras et al. 2022, "Elucidating the design space", sec. 2).

Betas and alpha_bar are computed in float32 exactly as diffusers does, so a model trained with diffusers (or
CompVis) sees the same numbers here; derived sigmas are float64.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from t2i.errors import ConfigError, InvalidInputError

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


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last step has zero SNR (Lin et al. 2023, Algorithm 1): sqrt(alpha_bar) shifted to end at 0 and
    rescaled to keep its first value, as diffusers' `rescale_betas_zero_snr` computes it."""
    root = alphas_cumprod_from_betas(betas).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


# Where zero terminal SNR would make the last sigma infinite, the VE scale that every sampler here runs on needs
# a finite one: diffusers' Euler and DPM-Solver schedulers use this alpha_bar (sigma ~ 4096) for the same reason.
ZERO_SNR_TERMINAL_ALPHA_BAR = 2.0**-24


def make_alphas_cumprod(
    beta_schedule: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    trained_betas: Sequence[float] | None = None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """alpha_bar (T,) float32 for a named beta schedule (defaults: Stable Diffusion), optionally rescaled to zero
    terminal SNR (its last entry then `ZERO_SNR_TERMINAL_ALPHA_BAR`)."""
    betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas)
    if not rescale_betas_zero_snr:
        return alphas_cumprod_from_betas(betas)
    alphas_cumprod = alphas_cumprod_from_betas(rescale_zero_terminal_snr(betas))
    alphas_cumprod[-1] = ZERO_SNR_TERMINAL_ALPHA_BAR
    return alphas_cumprod


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


def edm_sigmas(
    steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """(steps + 1,) float64: Karras et al. 2022 eq. 5, sigma_max down to sigma_min in rho-warped steps, then 0."""
    if not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"steps: got {steps!r}; expected an integer >= 1")
    if not 0 < sigma_min <= sigma_max:
        raise InvalidInputError(
            f"sigma_min, sigma_max: got {sigma_min}, {sigma_max}; expected 0 < min <= max"
        )
    return append_zero(karras_sigmas(steps, sigma_min, sigma_max, rho))


# ------------------------------------------------------------------------------------------ discrete schedule


@dataclass(frozen=True)
class DiscreteSchedule:
    """The training noise schedule of a discrete-time model, built once and shared by the training loss, the
    denoiser and the sampling plan. Fields use diffusers' scheduler-config names.

    `alphas_cumprod` (T,) float32 is computed exactly as diffusers does; `sigmas` (T,) float64 are its VE levels.
    """

    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    trained_betas: tuple[float, ...] | None = None
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES and self.trained_betas is None:
            raise ConfigError(
                f"beta_schedule: unknown value {self.beta_schedule!r}; expected one of {', '.join(BETA_SCHEDULES)}"
            )
        if self.num_train_timesteps < 1:
            raise ConfigError(f"num_train_timesteps: {self.num_train_timesteps}; expected an integer >= 1")

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> DiscreteSchedule:
        """From a diffusers scheduler config; missing keys take diffusers' defaults (linear, 1e-4 to 0.02)."""
        betas = config.get("trained_betas")
        return cls(
            beta_schedule=str(config.get("beta_schedule") or "linear"),
            num_train_timesteps=int(config.get("num_train_timesteps") or 1000),
            beta_start=float(config.get("beta_start", 0.0001)),
            beta_end=float(config.get("beta_end", 0.02)),
            trained_betas=tuple(float(b) for b in betas) if betas is not None else None,
            rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr", False)),
        )

    @classmethod
    def from_model_config(cls, model: Any) -> DiscreteSchedule:
        """From a `model:` section with NeMo's names (beta_schedule, timesteps, linear_start, linear_end) and
        `zero_terminal_snr`."""
        return cls(
            model.beta_schedule, int(model.timesteps), float(model.linear_start), float(model.linear_end),
            rescale_betas_zero_snr=bool(getattr(model, "zero_terminal_snr", False)),
        )  # fmt: skip

    def scheduler_config(self) -> dict[str, Any]:
        """The schedule's keys of a diffusers scheduler config."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
            "trained_betas": list(self.trained_betas) if self.trained_betas is not None else None,
            "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
        }

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        return make_alphas_cumprod(
            self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end, self.trained_betas,
            self.rescale_betas_zero_snr,
        )  # fmt: skip

    @cached_property
    def sigmas(self) -> torch.Tensor:
        return sigmas_from_alphas_cumprod(self.alphas_cumprod)


# ------------------------------------------------------------------------------------------ log-SNR schedules

LOGSNR_SCHEDULES = ("linear", "cosine")
_COSINE_S = 0.008
_COSINE_TAN2_FLOOR = 1e-5


@dataclass(frozen=True)
class LogSNRSchedule:
    """A continuous-time schedule: time t in [0, 1] -> log-SNR lambda(t), decreasing in t (Kingma et al. 2021,
    "Variational Diffusion Models"; the Imagen formulation of NeMo and imagen-pytorch). On the VE scale
    sigma^2 = exp(-lambda). Evaluated in the dtype of t.

    - `linear`: lambda(t) = -ln(expm1(1e-4 + 10 t^2)), the continuous limit of DDPM's linear betas 1e-4..0.02;
    - `cosine`: lambda(t) = -ln(max(tan^2(theta), 1e-5)), theta = (t + s) / (1 + s) * pi / 2, s = 0.008 (the
      alpha-cosine schedule of Nichol & Dhariwal; the floor caps the log-SNR at ln(1e5)).
    """

    name: str = "cosine"

    def __post_init__(self) -> None:
        if self.name not in LOGSNR_SCHEDULES:
            raise ConfigError(
                f"model.preconditioning.noise_schedule: {self.name!r} is not one of {', '.join(LOGSNR_SCHEDULES)}"
            )

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


def vp_coefficients(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma_vp) = (sqrt(sigmoid(lambda)), sqrt(sigmoid(-lambda))), shaped like logsnr."""
    return logsnr.sigmoid().sqrt(), (-logsnr).sigmoid().sqrt()


def continuous_sigmas(steps: int, schedule: LogSNRSchedule, *, final_zero: bool = True) -> torch.Tensor:
    """(steps + 1,) float64 decreasing VE sigmas at t = 1, 1 - 1/steps, ..., 0 (NeMo's sampling grid).

    The times are float32 as in NeMo, so the first level is the one NeMo's sampler starts from. With
    `final_zero` the last level (t = 0, the schedule's sigma_min) is replaced by 0, so the sample ends clean after
    the same `steps` model evaluations; without it the grid is exactly NeMo's, whose last step stops at t = 0.
    """
    if not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"steps: got {steps!r}; expected an integer >= 1")
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)
    sigmas = schedule.sigma(times)
    if final_zero:
        sigmas[-1] = 0.0
    return sigmas


# ------------------------------------------------------------------------------------------ rectified flow

TIME_SHIFT_TYPES = ("exponential", "linear")
# t = 1 (pure noise) on the VE scale: sigma = t / (1 - t) is infinite there, so the first level of a flow grid is
# this stand-in. t = sigma / (1 + sigma) then differs from 1 by 1e-10, which float32 rounds to exactly 1, and x =
# z (1 + sigma) stays far inside the float32 range.
FLOW_SIGMA_AT_ONE = 1e10


def flow_t_to_sigma(t: torch.Tensor | float) -> torch.Tensor:
    """VE noise level (float64, shaped like t) of rectified-flow time t: sigma = t / (1 - t); t = 1 gives
    `FLOW_SIGMA_AT_ONE`. A flow sample z_t = (1 - t) x0 + t eps is x = z_t / (1 - t) = x0 + sigma eps."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.where(t >= 1, torch.full_like(t, FLOW_SIGMA_AT_ONE), t / (1 - t).clamp(min=1e-300))


def flow_sigma_to_t(sigma: torch.Tensor | float) -> torch.Tensor:
    """Rectified-flow time (float64) of a VE noise level: t = sigma / (1 + sigma), the inverse of
    `flow_t_to_sigma`."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return sigma / (1 + sigma)


def shift_times(t: Any, shift: float) -> Any:
    """SD3's timestep shift (Esser et al. 2024, eq. 23): t' = shift t / (1 + (shift - 1) t); shift > 1 spends
    more of the schedule at high noise. Works on floats, numpy arrays and tensors (dtype kept)."""
    return shift * t / (1 + (shift - 1) * t)


def time_shift(mu: float, t: Any, sigma: float = 1.0, kind: str = "exponential") -> Any:
    """Flux's resolution-dependent shift: e^mu / (e^mu + (1/t - 1)^sigma) (`exponential`), or mu / (mu +
    (1/t - 1)^sigma) (`linear`); t = 1 stays 1. Works on floats, numpy arrays and tensors (dtype kept)."""
    if kind not in TIME_SHIFT_TYPES:
        raise ConfigError(f"time_shift_type: {kind!r} is not one of {', '.join(TIME_SHIFT_TYPES)}")
    scale = math.exp(mu) if kind == "exponential" else mu
    return scale / (scale + (1 / t - 1) ** sigma)


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's shift mu for an image of `image_seq_len` packed tokens: the line through (base_seq_len, base_shift)
    and (max_seq_len, max_shift), extrapolated beyond them (diffusers' `calculate_shift`)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def image_seq_len(height: int, width: int, patch_size: int = 2) -> int:
    """Tokens of a (height, width) latent packed into patch_size x patch_size patches."""
    return (height // patch_size) * (width // patch_size)


def flux_sampling_times(steps: int) -> np.ndarray:
    """The times FluxPipeline hands its scheduler: `steps` evenly spaced from 1 down to 1 / steps (float64)."""
    if not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"steps: got {steps!r}; expected an integer >= 1")
    return np.linspace(1.0, 1 / steps, steps)


@dataclass(frozen=True)
class FlowSchedule:
    """The time schedule of a rectified-flow model, shared by the training loss and the sampling plan. Fields use
    the names of diffusers' `FlowMatchEulerDiscreteScheduler` config.

    Times t run from 0 (data) to 1 (noise). `shift` is SD3's fixed shift; with `use_dynamic_shifting` the shift is
    Flux's `time_shift(mu, t)` with mu = `mu(image_seq_len)` instead (the fixed shift is then unused).
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 1:
            raise ConfigError(f"num_train_timesteps: {self.num_train_timesteps}; expected an integer >= 1")
        if self.shift <= 0:
            raise ConfigError(f"shift: {self.shift}; expected a number > 0")
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise ConfigError(
                f"time_shift_type: {self.time_shift_type!r} is not one of {', '.join(TIME_SHIFT_TYPES)}"
            )

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> FlowSchedule:
        """From a diffusers FlowMatch* scheduler config; missing keys take diffusers' defaults."""
        defaults = cls()

        def get(name: str) -> Any:
            value = config.get(name)
            return getattr(defaults, name) if value is None else value

        return cls(
            num_train_timesteps=int(get("num_train_timesteps")),
            shift=float(get("shift")),
            use_dynamic_shifting=bool(get("use_dynamic_shifting")),
            base_shift=float(get("base_shift")),
            max_shift=float(get("max_shift")),
            base_image_seq_len=int(get("base_image_seq_len")),
            max_image_seq_len=int(get("max_image_seq_len")),
            time_shift_type=str(get("time_shift_type")),
        )

    def scheduler_config(self) -> dict[str, Any]:
        """The schedule's keys of a diffusers FlowMatchEulerDiscreteScheduler config."""
        return dataclasses.asdict(self)

    def mu(self, seq_len: int) -> float:
        """Flux's mu for an image of `seq_len` packed tokens (`flux_mu` with this schedule's end points)."""
        return flux_mu(seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift, self.max_shift)

    def shifted(self, t: Any, mu: float | None = None) -> Any:
        """t after this schedule's shift: Flux's time_shift(mu, t) with dynamic shifting (mu required), else SD3's
        fixed shift. Floats, numpy arrays and tensors (dtype kept)."""
        if self.use_dynamic_shifting:
            if mu is None:
                raise InvalidInputError("mu: required with use_dynamic_shifting (Flux's shift for the image size)")
            return time_shift(mu, t, 1.0, self.time_shift_type)
        return shift_times(t, self.shift)

    def train_times(self) -> np.ndarray:
        """The scheduler's table of training times (T,) float32, 1 down to 1/T, fixed shift applied when not
        dynamic (diffusers' `FlowMatchEulerDiscreteScheduler.__init__`)."""
        steps = self.num_train_timesteps
        t = np.linspace(1, steps, steps, dtype=np.float32)[::-1].copy() / np.float32(steps)
        return t if self.use_dynamic_shifting else shift_times(t, float(self.shift)).astype(np.float32)

    def sampling_times(
        self,
        steps: int,
        mu: float | None = None,
        times: Sequence[float] | np.ndarray | None = None,
        shift_terminal: float | None = None,
    ) -> torch.Tensor:
        """Decreasing flow times (steps + 1,) float64 ending at 0, as `FlowMatchEulerDiscreteScheduler.set_timesteps`
        lays them out (float32 values, like diffusers').

        Without `times` the grid spans the training table's end points (so a fixed shift acts twice, as in
        diffusers); `times` (steps,) are a pipeline's own times (FluxPipeline: `flux_sampling_times`), shifted
        here. `mu` is Flux's shift (dynamic shifting); `shift_terminal` stretches the grid to end there.
        """
        if times is None:
            if not isinstance(steps, int) or steps < 1:
                raise InvalidInputError(f"steps: got {steps!r}; expected an integer >= 1")
            table = self.train_times()
            t_max, t_min = float(table[0]), float(table[-1])
            n = self.num_train_timesteps
            t = np.linspace(t_max * n, t_min * n, steps) / n
        else:
            t = np.asarray(times, dtype=np.float32)
        t = self.shifted(t, mu)
        if shift_terminal:
            one_minus = 1 - t
            t = 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))
        grid = torch.from_numpy(np.asarray(t)).to(torch.float32).double()
        return torch.cat([grid, grid.new_zeros(1)])
