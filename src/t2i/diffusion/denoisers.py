"""Adapters that turn a backbone into a denoiser `D(x, sigma, cond) -> x0_hat` on the VE scale `x = x0 + sigma eps`.

`DiscreteDenoiser` wraps a network trained on a discrete beta schedule (eps, v or x0 prediction), the way
k-diffusion's `DiscreteEpsDDPMDenoiser` does: the network sees `x / sqrt(1 + sigma^2)` (its own VP-scaled input)
and the (fractional) timestep whose sigma matches, found by interpolating log-sigma.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from t2i.diffusion.schedules import sigmas_from_alphas_cumprod
from t2i.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_PREDICTION_ALIASES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample", "original_sample": "sample"}


def normalize_prediction_type(prediction_type: str) -> str:
    """Map config spellings (`eps`, `v`, `x0`, diffusers' names) to `epsilon | v_prediction | sample`."""
    name = _PREDICTION_ALIASES.get(prediction_type, prediction_type)
    if name not in PREDICTION_TYPES:
        raise ConfigError(
            f"prediction_type: unknown value {prediction_type!r}; expected one of "
            f"{', '.join(PREDICTION_TYPES)} (or eps, v, x0)"
        )
    return name


def _append_dims(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dimensions in all, for broadcasting against x."""
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


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
        model: callable `model(x_in (B,C,H,W), t (B,) float, **cond) -> (B,C,H,W)`.
        alphas_cumprod: (T,) alpha_bar of the training schedule.
        prediction_type: `epsilon`, `v_prediction` or `sample` (aliases `eps`, `v`, `x0`).
        quantize: round the timestep to the nearest integer instead of interpolating (what a model that only
            accepts integer timesteps needs).
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        quantize: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.prediction_type = normalize_prediction_type(prediction_type)
        self.quantize = quantize
        sigmas = sigmas_from_alphas_cumprod(torch.as_tensor(alphas_cumprod))
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    @property
    def num_train_timesteps(self) -> int:
        return int(self.sigmas.shape[0])

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
        self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any] | None = None
    ) -> torch.Tensor:
        """x (B,C,H,W) on the VE scale, sigma (B,) -> x0_hat (B,C,H,W)."""
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        s = _append_dims(sigma.to(x.dtype), x.ndim)
        c_in = 1 / (s**2 + 1).sqrt()
        t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        t = self.sigma_to_t(sigma).to(device=x.device, dtype=t_dtype)
        out = self.model(x * c_in, t, **(cond or {}))
        return self.output_to_x0(out, x, s)

    def output_to_x0(self, out: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Convert the network output to x0 on the VE scale (s broadcastable to x)."""
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            # v = alpha eps - sigma_vp x0 with alpha = 1/sqrt(1+s^2) (Salimans & Ho 2022, sec. 4).
            return x / (s**2 + 1) - out * s / (s**2 + 1).sqrt()
        return out
