"""Denoiser adapters: each turns a backbone into `D(x, sigma, cond) -> x0_hat` on the VE scale `x = x0 + sigma eps`,
the one contract that samplers, guidance and the pipelines see.

- `DiscreteDenoiser`: a network trained on a discrete beta schedule (eps, v or x0 prediction), the way
  k-diffusion's `DiscreteEpsDDPMDenoiser` does it: the network sees `x / sqrt(1 + sigma^2)` (its own VP-scaled
  input) and the (fractional) timestep whose sigma matches, found by interpolating log-sigma.
- `EDMDenoiser`: EDM preconditioning (Karras et al. 2022, Table 1) around any backbone.
- `ContinuousDDPMDenoiser`: a continuous-time DDPM network on a log-SNR schedule (Imagen; NeMo's DDPM).
- `FlowDenoiser`: a rectified-flow network predicting the velocity v = eps - x0 (Flux, SD3): x0 = z_t - t v.

Every denoiser exposes `sigma_min` and `sigma_max` and keeps its backbone as `.net`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from t2i.diffusion.parameterization import normalize_prediction, x0_from_output
from t2i.diffusion.schedules import DiscreteSchedule, LogSNRSchedule, flow_sigma_to_t, flow_t_to_sigma
from t2i.diffusion.tensors import append_dims, batch_sigma, compute_dtype
from t2i.errors import ConfigError

TIME_CONDS = ("logsnr", "t")


class DenoiserWrapper(nn.Module):
    """Base of wrappers around a denoiser (guidance, thresholding): keeps `inner` and passes its sigma range on."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner

    @property
    def sigma_min(self) -> float:
        return self.inner.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.inner.sigma_max


class DiscreteDenoiser(nn.Module):
    """Denoiser for a discrete-time eps / v / x0 network on a beta schedule.

    Args:
        net: callable `net(x_in (B,C,H,W), t (B,) float, **cond) -> (B,C,H,W)`.
        schedule: the training schedule.
        prediction: `eps`, `v` or `x0` (any spelling `normalize_prediction` accepts).
        quantize: round the timestep to the nearest integer instead of interpolating (what a sampling plan asks
            for when diffusers feeds its model integer timesteps, e.g. DPM-Solver++ with Karras sigmas).
    """

    def __init__(
        self,
        net: Callable[..., torch.Tensor],
        schedule: DiscreteSchedule,
        prediction: str = "eps",
        quantize: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.prediction = normalize_prediction(prediction)
        self.quantize = quantize
        self.register_buffer("sigmas", schedule.sigmas, persistent=False)
        self.register_buffer("log_sigmas", schedule.sigmas.log(), persistent=False)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep (same shape as sigma, float64) by linear interpolation in log-sigma."""
        log_sigma = sigma.double().to(self.log_sigmas.device).clamp(min=1e-10).log()
        log_sigmas = self.log_sigmas
        low = torch.searchsorted(log_sigmas, log_sigma, right=True).sub(1).clamp(0, len(log_sigmas) - 2)
        w = (log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])
        t = low + w.clamp(0, 1)
        return t.round() if self.quantize else t

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at a (fractional) timestep by linear interpolation in log-sigma (inverse of `sigma_to_t`)."""
        t = t.double().to(self.log_sigmas.device).clamp(0, len(self.log_sigmas) - 1)
        low = t.floor().long().clamp(max=len(self.log_sigmas) - 2)
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]).exp()

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict[str, Any] | None = None
    ) -> torch.Tensor:
        """x (B,C,H,W) on the VE scale, sigma (B,) or scalar -> x0_hat (B,C,H,W)."""
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        s = append_dims(sigma.to(x.dtype), x.ndim)
        c_in = 1 / (s**2 + 1).sqrt()
        t = self.sigma_to_t(sigma).to(device=x.device, dtype=compute_dtype(x))
        out = self.net(x * c_in, t, **(cond or {}))
        return x0_from_output(out, x, s, self.prediction)


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5) -> dict[str, torch.Tensor]:
    """c_skip, c_out, c_in, c_noise (each shaped like sigma) of Karras et al. 2022, Table 1."""
    total = sigma**2 + sigma_data**2
    return {
        "c_skip": sigma_data**2 / total,
        "c_out": sigma * sigma_data / total.sqrt(),
        "c_in": 1 / total.sqrt(),
        "c_noise": sigma.log() / 4,
    }


class EDMDenoiser(nn.Module):
    """EDM preconditioning around any backbone (Karras et al. 2022, Table 1, "Ours"):

        D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))

    Args:
        net: backbone called as `net(c_in * x (B,C,H,W), c_noise (B,), **cond) -> F (B,C,H,W)`.
        sigma_data: expected standard deviation of the training data.
        sigma_min, sigma_max: the noise range the model serves (the sampling defaults of the paper).
    """

    def __init__(
        self,
        net: Callable[..., torch.Tensor],
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict[str, Any] | None = None
    ) -> torch.Tensor:
        """x (B,C,H,W) on the VE scale, sigma (B,) or scalar -> x0_hat (B,C,H,W) in x's dtype."""
        sigma = batch_sigma(sigma, x)
        c = edm_coefficients(sigma, self.sigma_data)
        c_skip, c_out, c_in = (append_dims(c[k], x.ndim) for k in ("c_skip", "c_out", "c_in"))
        x_wide = x.to(sigma.dtype)
        F_x = self.net((c_in * x_wide).to(x.dtype), c["c_noise"], **(cond or {}))
        return (c_skip * x_wide + c_out * F_x.to(sigma.dtype)).to(x.dtype)


class ContinuousDDPMDenoiser(nn.Module):
    """A continuous-time DDPM network under the denoiser contract D(x, sigma, cond) -> x0.

    The VP forward process is z_t = alpha x0 + sigma_vp eps with alpha^2 = sigmoid(lambda); on the VE scale
    (x = z_t / alpha) sigma^2 = exp(-lambda), so sigma <-> lambda = -2 ln(sigma) <-> t = lambda^-1(lambda).

    Args:
        net: backbone `net(z_t (B,C,H,W), time_cond (B,), **cond) -> prediction (B,C,H,W)`, where z_t is the VP
            sample x / sqrt(1 + sigma^2) and time_cond the log-SNR (default, NeMo) or t.
        schedule: the log-SNR schedule.
        prediction: what the network predicts: `eps`, `x0` or `v` (NeMo's noise / x_start / v accepted).
        time_cond: `logsnr` (NeMo) or `t`.
    """

    def __init__(
        self,
        net: Callable[..., torch.Tensor],
        schedule: LogSNRSchedule,
        prediction: str = "eps",
        time_cond: str = "logsnr",
    ) -> None:
        super().__init__()
        if time_cond not in TIME_CONDS:
            raise ConfigError(f"time_cond: {time_cond!r} is not one of {', '.join(TIME_CONDS)}")
        self.net = net
        self.schedule = schedule
        self.prediction = normalize_prediction(prediction, "model.preconditioning.pred_objective")
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

    def condition(self, logsnr: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """What the network is conditioned on: the log-SNR itself, or its time t."""
        if self.time_cond == "logsnr":
            return logsnr
        return self.schedule.t_from_logsnr(logsnr) if t is None else t

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict[str, Any] | None = None
    ) -> torch.Tensor:
        """x (B,C,H,W) on the VE scale, sigma (B,) or scalar -> x0_hat (B,C,H,W) in x's dtype."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float64)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        logsnr = -2 * sigma.log()
        wide = compute_dtype(x)
        s = append_dims(sigma, x.ndim).to(wide)
        z_t = x.to(wide) / (1 + s**2).sqrt()
        out = self.net(z_t.to(x.dtype), self.condition(logsnr).to(wide), **(cond or {}))
        return x0_from_output(out.to(wide), x.to(wide), s, self.prediction).to(x.dtype)


class FlowDenoiser(nn.Module):
    """A rectified-flow (velocity) network under the denoiser contract D(x, sigma, cond) -> x0.

    The flow sample is z_t = (1 - t) x0 + t eps and the network predicts v = eps - x0, so x0 = z_t - t v. On the
    VE scale x = z_t / (1 - t) = x0 + sigma eps with sigma = t / (1 - t), i.e. t = sigma / (1 + sigma) and
    z_t = x / (1 + sigma). t = 1 (pure noise) is sigma = `FLOW_SIGMA_AT_ONE`, where float32 rounds t to 1.

    Args:
        net: backbone `net(z_t (B,C,H,W), t (B,) in [0, 1], **cond) -> v (B,C,H,W)`; cond carries the text
            (`context`, `pooled`) and, for guidance-distilled models, `guidance` (B,).
        t_min, t_max: the range of times the model serves (`sigma_min` / `sigma_max` on the VE scale).
    """

    def __init__(self, net: Callable[..., torch.Tensor], t_min: float = 1e-3, t_max: float = 1.0) -> None:
        super().__init__()
        if not 0 < t_min < t_max <= 1:
            raise ConfigError(f"flow denoiser t_min, t_max: {t_min}, {t_max}; expected 0 < t_min < t_max <= 1")
        self.net = net
        self.t_min, self.t_max = float(t_min), float(t_max)

    @property
    def sigma_min(self) -> float:
        return float(flow_t_to_sigma(self.t_min))

    @property
    def sigma_max(self) -> float:
        return float(flow_t_to_sigma(self.t_max))

    @staticmethod
    def sigma_to_t(sigma: torch.Tensor | float) -> torch.Tensor:
        """Flow time t = sigma / (1 + sigma), float64."""
        return flow_sigma_to_t(sigma)

    @staticmethod
    def t_to_sigma(t: torch.Tensor | float) -> torch.Tensor:
        """VE noise level sigma = t / (1 - t), float64 (`FLOW_SIGMA_AT_ONE` at t = 1)."""
        return flow_t_to_sigma(t)

    def velocity(
        self, z: torch.Tensor, t: torch.Tensor, cond: dict[str, Any] | None = None
    ) -> torch.Tensor:
        """The network's velocity at the flow sample z (B, ...) and time t (B,), in z's dtype."""
        return self.net(z, t.to(device=z.device, dtype=compute_dtype(z)), **(cond or {}))

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict[str, Any] | None = None
    ) -> torch.Tensor:
        """x (B,C,H,W) on the VE scale, sigma (B,) or scalar -> x0_hat (B,C,H,W) in x's dtype."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float64)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        t = self.sigma_to_t(sigma)
        wide = compute_dtype(x)
        z = x.to(wide) / append_dims(1 + sigma, x.ndim).to(wide)
        v = self.velocity(z.to(x.dtype), t, cond)
        return (z - append_dims(t, x.ndim).to(wide) * v.to(wide)).to(x.dtype)
