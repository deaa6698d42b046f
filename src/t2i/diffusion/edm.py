"""EDM: the preconditioning, training loss and Heun sampler of Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models" (the formulation of NVlabs/edm and NeMo's `preconditioning_type: EDM`).

The denoiser works on the VE scale `x = x0 + sigma * n`. A backbone F is wrapped as (Table 1, "Ours")

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
    c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4,

with sd = sigma_data. Training draws ln(sigma) ~ N(p_mean, p_std^2) and weights the x0 error by
lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, which makes the effective target of F unit-variance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from t2i.diffusion.samplers import (
    Callback,
    Churn,
    Denoiser,
    StepDenoiser,
    churned_ode_loop,
    noise_like,
    register_sampler,
)
from t2i.diffusion.schedules import append_zero, karras_sigmas
from t2i.errors import ConfigError, InvalidInputError

LOSS_TYPES = ("l1", "l2", "huber")
EDM_CONFIG_KEYS = ("loss_type", "sigma_data", "p_mean", "p_std")


def append_dims(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dimensions in all, for broadcasting against x."""
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32 (coefficients in half precision lose too much)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _batch_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """sigma as a (B,) tensor on x's device in the compute dtype (a scalar is broadcast over the batch)."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=_compute_dtype(x))
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


# ------------------------------------------------------------------------------------------ preconditioning


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
    """EDM preconditioning around any backbone, giving the denoiser contract D(x, sigma, cond) -> x0.

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
        sigma = _batch_sigma(sigma, x)
        c = edm_coefficients(sigma, self.sigma_data)
        c_skip, c_out, c_in = (append_dims(c[k], x.ndim) for k in ("c_skip", "c_out", "c_in"))
        x_wide = x.to(sigma.dtype)
        F_x = self.net((c_in * x_wide).to(x.dtype), c["c_noise"], **(cond or {}))
        return (c_skip * x_wide + c_out * F_x.to(sigma.dtype)).to(x.dtype)


EDMPreconditioner = EDMDenoiser


# ------------------------------------------------------------------------------------------------- training


def regression_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2") -> torch.Tensor:
    """Per-sample loss (B,): the l1 / l2 / huber (smooth l1, beta 1) error averaged over all but the batch dim."""
    if loss_type == "l2":
        err = F.mse_loss(pred, target, reduction="none")
    elif loss_type == "l1":
        err = F.l1_loss(pred, target, reduction="none")
    elif loss_type == "huber":
        err = F.smooth_l1_loss(pred, target, reduction="none")
    else:
        raise ConfigError(f"loss_type: unknown value {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    return err.flatten(1).mean(dim=1)


def sample_lognormal_sigmas(
    batch: int,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """sigma (batch,) float32 with ln(sigma) ~ N(p_mean, p_std^2) (Karras et al. 2022, Table 1 training)."""
    normal = torch.randn(batch, generator=generator, device=_generator_device(generator, device))
    return (normal * p_std + p_mean).exp().to(device)


def _generator_device(generator: torch.Generator | None, device: torch.device | str) -> torch.device:
    return generator.device if generator is not None else torch.device(device)


class EDMLoss:
    """EDM training loss: sigma ~ lognormal(p_mean, p_std), loss = lambda(sigma) * err(D(x0 + sigma n), x0).

    As in NeMo, sqrt(lambda) scales prediction and target before the error function, so `l2` is exactly the
    paper's lambda * ||D - x0||^2 and `l1` / `huber` are the same errors measured on F's unit-variance scale.
    """

    def __init__(
        self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5, loss_type: str = "l2"
    ) -> None:
        if loss_type not in LOSS_TYPES:
            raise ConfigError(
                f"model.preconditioning.loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}"
            )
        self.p_mean, self.p_std, self.sigma_data, self.loss_type = p_mean, p_std, sigma_data, loss_type

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, shaped like sigma."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def __call__(
        self,
        denoiser: Denoiser,
        x0: torch.Tensor,
        cond: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
        sigma: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses (B,) and the sigmas (B,) used. `denoiser` is the preconditioned model (an
        EDMDenoiser); `sigma` / `noise` override the random draws (tests, evaluation at fixed levels)."""
        if sigma is None:
            sigma = sample_lognormal_sigmas(x0.shape[0], self.p_mean, self.p_std, generator, x0.device)
        sigma = sigma.to(device=x0.device, dtype=_compute_dtype(x0))
        noise = noise_like(x0, generator) if noise is None else noise
        x_noisy = x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * noise
        denoised = denoiser(x_noisy, sigma, cond)
        root_weight = append_dims(self.weight(sigma).sqrt(), x0.ndim)
        losses = regression_loss(root_weight * denoised, root_weight * x0, self.loss_type)
        return losses, sigma


def edm_from_config(
    net: Callable[..., torch.Tensor], preconditioning: Mapping[str, Any] | None = None
) -> tuple[EDMDenoiser, EDMLoss]:
    """(EDMDenoiser, EDMLoss) from NeMo's `model.preconditioning` mapping (keys loss_type, sigma_data, p_mean,
    p_std; unknown keys raise ConfigError)."""
    options = dict(preconditioning or {})
    unknown = sorted(set(options) - set(EDM_CONFIG_KEYS))
    if unknown:
        raise ConfigError(
            f"model.preconditioning.{unknown[0]}: unknown key for EDM; valid keys: {', '.join(EDM_CONFIG_KEYS)}"
        )
    for key in ("sigma_data", "p_std"):
        if key in options and not float(options[key]) > 0:
            raise ConfigError(f"model.preconditioning.{key}: expected a number > 0, got {options[key]!r}")
    loss = EDMLoss(
        p_mean=float(options.get("p_mean", -1.2)),
        p_std=float(options.get("p_std", 1.2)),
        sigma_data=float(options.get("sigma_data", 0.5)),
        loss_type=str(options.get("loss_type", "l2")),
    )
    return EDMDenoiser(net, sigma_data=loss.sigma_data), loss


# ------------------------------------------------------------------------------------------------- sampling


def edm_sigmas(
    steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """(steps + 1,) float64: Karras et al. 2022 eq. 5, sigma_max down to sigma_min in rho-warped steps, then 0."""
    if steps < 1:
        raise InvalidInputError(f"steps: got {steps}; expected an integer >= 1")
    if not 0 < sigma_min <= sigma_max:
        raise InvalidInputError(
            f"sigma_min, sigma_max: got {sigma_min}, {sigma_max}; expected 0 < min <= max"
        )
    return append_zero(karras_sigmas(steps, sigma_min, sigma_max, rho))


@register_sampler("edm_heun")
def sample_edm_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: dict[str, Any] | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = float("inf"),
    S_noise: float = 1.0,
) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 2: optional churn (raise sigma_i to sigma_hat = (1 + gamma) sigma_i with
    fresh noise), an Euler step of the PF-ODE to sigma_{i+1}, and Heun's correction unless sigma_{i+1} = 0.

    x (B, ...) enters scaled by sigmas[0]; sigmas (N + 1,) decreasing (edm_sigmas). Noise is drawn only on
    steps with gamma > 0, so S_churn = 0 is deterministic and consumes no random numbers.
    """
    sigmas = torch.as_tensor(sigmas, device=x.device, dtype=_compute_dtype(x))
    # sigma reaches the denoiser in the compute dtype, as EDMDenoiser computes, even for a half-precision x
    denoise = StepDenoiser(denoiser, cond, callback, batch_sigma=_batch_sigma)
    churn = Churn(S_churn, S_tmin, S_tmax, S_noise)
    return churned_ode_loop(denoise, x, sigmas, churn, generator, progress, second_order=True)
