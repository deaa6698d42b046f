"""Discrete-time diffusion training objective: sample t and noise, build the eps / v / x0 target, weight the loss.

Forward process (Ho et al. 2020, eq. 4): ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps`` for integer
``t in [0, T)``. Targets by parameterisation:

- ``eps``: the noise ``eps``;
- ``v``:   ``v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0`` (Salimans & Ho 2022, sec. 4);
- ``x0``:  the clean sample.

Min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy") with
``snr = alpha_bar / (1 - alpha_bar)``: the x0-space weight ``min(snr, gamma)`` expressed per target, i.e.
``min(snr, gamma) / snr`` for eps, ``min(snr, gamma) / (snr + 1)`` for v and ``min(snr, gamma)`` for x0.

Offset noise (Guttenberg 2023) adds a per-(sample, channel) constant to the noise so the model learns to change
an image's mean brightness. Everything here is architecture-agnostic: the network is any callable
``model(x_t, t, **cond) -> prediction``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from t2i.errors import ConfigError

PARAMETERIZATIONS = ("eps", "v", "x0")
_ALIASES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def normalize_parameterization(name: str) -> str:
    """Map `eps | v | x0` (or diffusers' `epsilon | v_prediction | sample`) to `eps | v | x0`."""
    name = _ALIASES.get(name, name)
    if name not in PARAMETERIZATIONS:
        raise ConfigError(f"model.parameterization: {name!r} is not one of {', '.join(PARAMETERIZATIONS)}")
    return name


def _bcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) matching `like`'s rank, dtype and device."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def sample_timesteps(batch: int, num_timesteps: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform integer timesteps (batch,) long in [0, num_timesteps)."""
    return torch.randint(0, num_timesteps, (batch,), generator=generator, device=device)


def sample_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 offset: float = 0.0) -> torch.Tensor:
    """Standard normal noise (B, C, H, W); with `offset` > 0 plus `offset * N(0, 1)` per (sample, channel)."""
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if offset > 0:
        per_channel = torch.randn((shape[0], shape[1], *([1] * (len(shape) - 2))), generator=generator,
                                  device=device, dtype=dtype)
        noise = noise + offset * per_channel
    return noise


def q_sample(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise; x0, noise (B, ...), t (B,) long."""
    alpha_bar = _bcast(alphas_cumprod.to(x0.device)[t], x0)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0 (B, ...)."""
    alpha_bar = _bcast(alphas_cumprod.to(x0.device)[t], x0)
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0


def training_target(parameterization: str, x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """What the network regresses onto: noise (eps), velocity (v) or the clean sample (x0)."""
    kind = normalize_parameterization(parameterization)
    if kind == "eps":
        return noise
    if kind == "v":
        return velocity(x0, noise, alphas_cumprod, t)
    return x0


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), (B,) float32."""
    alpha_bar = alphas_cumprod.to(t.device)[t].float()
    return alpha_bar / (1 - alpha_bar)


def min_snr_weight(snr_t: torch.Tensor, gamma: float, parameterization: str) -> torch.Tensor:
    """Per-sample Min-SNR-gamma loss weight (B,) for a target in `parameterization` space."""
    clipped = torch.clamp(snr_t, max=gamma)
    kind = normalize_parameterization(parameterization)
    if kind == "eps":
        return clipped / snr_t
    if kind == "v":
        return clipped / (snr_t + 1)
    return clipped


@dataclass
class NoisedBatch:
    """One training step's inputs: x_t (B, ...), t (B,) long, target (B, ...), weight (B,) float."""

    x_t: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor


class DiffusionObjective:
    """Weighted MSE between a network's prediction at (x_t, t) and the parameterisation's target.

    Args:
        alphas_cumprod: (T,) alpha_bar of the training schedule.
        parameterization: `eps`, `v` or `x0`.
        min_snr_gamma: None for uniform weights, else the Min-SNR gamma (5 in the paper).
        offset_noise: strength of the per-channel offset noise (0 = off; ~0.1 is usual).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, parameterization: str = "eps",
                 min_snr_gamma: float | None = None, offset_noise: float = 0.0) -> None:
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
        self.parameterization = normalize_parameterization(parameterization)
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ConfigError(f"model.min_snr_gamma: expected null or a number > 0, got {min_snr_gamma!r}")
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = float(offset_noise)

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def prepare(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> NoisedBatch:
        """Draw t, then noise (in that order, from `generator`), and build x_t, the target and the weights."""
        t = sample_timesteps(x0.shape[0], self.num_timesteps, generator, x0.device)
        noise = sample_noise(x0.shape, generator, x0.device, x0.dtype, self.offset_noise)
        alphas_cumprod = self.alphas_cumprod.to(x0.device)
        x_t = q_sample(x0, noise, alphas_cumprod, t)
        target = training_target(self.parameterization, x0, noise, alphas_cumprod, t)
        if self.min_snr_gamma is None:
            weight = torch.ones(x0.shape[0], device=x0.device)
        else:
            weight = min_snr_weight(snr(alphas_cumprod, t), self.min_snr_gamma, self.parameterization)
        return NoisedBatch(x_t, t, target, weight)

    def weighted_mse(self, prediction: torch.Tensor, batch: NoisedBatch) -> torch.Tensor:
        """Mean over samples of weight * per-sample MSE; computed in float32 whatever the model's dtype."""
        per_sample = F.mse_loss(prediction.float(), batch.target.float(), reduction="none")
        per_sample = per_sample.reshape(per_sample.shape[0], -1).mean(dim=1)
        return (per_sample * batch.weight.float()).mean()

    def loss(self, model: Callable[..., torch.Tensor], x0: torch.Tensor, cond: dict[str, Any] | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Scalar loss of `model(x_t, t, **cond)` on clean samples x0 (B, C, H, W)."""
        batch = self.prepare(x0, generator)
        return self.weighted_mse(model(batch.x_t, batch.t, **(cond or {})), batch)
