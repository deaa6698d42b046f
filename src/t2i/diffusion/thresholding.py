"""Thresholding of the predicted x0 as a denoiser wrapper (Saharia et al. 2022, "Imagen", sec. 2.3).

Static thresholding clips x0_hat to [-1, 1]. Dynamic thresholding picks, per sample, s = the `percentile`
quantile of |x0_hat|, floors it at 1, clips x0_hat to [-s, s] and divides by s, which pushes saturated pixels
inwards instead of letting large guidance weights blow the image out. Samplers see an ordinary denoiser, so
every sampler gets it for free; wrap it around the guided denoiser (`DynamicThresholding(CFGDenoiser(...))`).
"""

from __future__ import annotations

from typing import Any

import torch

from t2i.diffusion.denoisers import DenoiserWrapper
from t2i.errors import ConfigError

THRESHOLDING_METHODS = ("dynamic", "static")


def batch_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row quantile with linear interpolation (numpy's default). values (B, N) -> (B,).

    Sorting instead of `torch.quantile` keeps it working for inputs above torch.quantile's 16M-element limit.
    """
    ordered = values.sort(dim=-1).values
    position = q * (values.shape[-1] - 1)
    low = int(position)
    high = min(low + 1, values.shape[-1] - 1)
    return torch.lerp(ordered[:, low], ordered[:, high], position - low)


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995) -> torch.Tensor:
    """x0 (B, ...) -> clamp(x0, -s, s) / s with s = max(1, quantile(|x0|, percentile)) per sample."""
    wide = x0.float() if x0.dtype in (torch.float16, torch.bfloat16) else x0
    s = batch_quantile(wide.flatten(1).abs(), percentile).clamp(min=1.0)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return (wide.clamp(-s, s) / s).to(x0.dtype)


def static_threshold(x0: torch.Tensor) -> torch.Tensor:
    """x0 clipped to [-1, 1]."""
    return x0.clamp(-1.0, 1.0)


class DynamicThresholding(DenoiserWrapper):
    """Denoiser wrapper thresholding the inner denoiser's x0_hat.

    Args:
        inner: a denoiser `D(x, sigma, cond) -> x0_hat`.
        percentile: the quantile of |x0_hat| used as the per-sample threshold (Imagen uses 0.995).
        enabled: False passes x0_hat through untouched (so a config switch needs no branching at the call site).
        method: `dynamic` (default) or `static` (clip to [-1, 1]).
    """

    def __init__(
        self, inner: Any, percentile: float = 0.995, enabled: bool = True, method: str = "dynamic"
    ) -> None:
        super().__init__(inner)
        if method not in THRESHOLDING_METHODS:
            raise ConfigError(f"thresholding: {method!r} is not one of {', '.join(THRESHOLDING_METHODS)}")
        if not 0 < percentile <= 1:
            raise ConfigError(f"dynamic_thresholding: percentile {percentile!r}; expected a number in (0, 1]")
        self.percentile = float(percentile)
        self.enabled = bool(enabled)
        self.method = method

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any] | None = None
    ) -> torch.Tensor:
        """x (B, ...), sigma (B,) -> thresholded x0_hat (B, ...)."""
        x0 = self.inner(x, sigma, cond)
        if not self.enabled:
            return x0
        if self.method == "static":
            return static_threshold(x0)
        return dynamic_threshold(x0, self.percentile)
