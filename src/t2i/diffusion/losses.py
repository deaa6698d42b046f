"""Training losses, one per denoiser adapter. Each is called the same way:

    loss(denoiser, x0 (B, ...), cond=None, generator=None) -> per-sample losses (B,) float32

It draws its own noise levels and noise from `generator` (so runs are reproducible and resumable), reaches the
backbone through `denoiser.net` when it regresses the raw network output, and applies its own weighting. The
task takes the mean. With `teacher=` (a second denoiser of the same kind, e.g. the frozen base model under a
LoRA) the regression target is the teacher's output at the same noisy input instead of the data's target:
distillation with the loss's own weighting.

- `DiscreteDiffusionLoss` (Ho et al. 2020, eq. 4): integer t, x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps,
  the eps / v / x0 target, optional Min-SNR-gamma weighting (Hang et al. 2023) and offset noise (Guttenberg 2023).
- `EDMLoss` (Karras et al. 2022): ln(sigma) ~ N(p_mean, p_std^2), weight lambda(sigma) = (sigma^2 + sd^2) /
  (sigma sd)^2 on the x0 error of the preconditioned denoiser.
- `ContinuousDDPMLoss` (NeMo's continuous DDPM): t ~ U(0, 1) on a log-SNR schedule, unweighted error on the
  noise / x0 / v target.
- `FlowMatchingLoss` (rectified flow; Esser et al. 2024, SD3): z_t = (1 - t) x0 + t eps, the velocity target
  eps - x0, t from SD3's densities (uniform, logit-normal, mode) through the model's shift, SD3's loss weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from t2i.diffusion.parameterization import regression_target
from t2i.diffusion.schedules import FlowSchedule, image_seq_len, vp_coefficients
from t2i.diffusion.tensors import append_dims, compute_dtype, noise_like
from t2i.errors import ConfigError

LOSS_TYPES = ("l1", "l2", "huber")


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


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"model.preconditioning.loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")


def _device_of(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


# ------------------------------------------------------------------------------------------------ discrete


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Per-sample Min-SNR-gamma weight (B,) for a target in `prediction` space: the x0-space weight
    min(snr, gamma) expressed per target (/ snr for eps, / (snr + 1) for v)."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1)
    return clipped


@dataclass
class NoisedBatch:
    """One training step's inputs: x_t (B, ...), t (B,) long, target (B, ...), weight (B,) float."""

    x_t: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor


class DiscreteDiffusionLoss:
    """Weighted MSE between the network's prediction at (x_t, t) and the target of the denoiser's prediction type,
    on the denoiser's discrete schedule (a `DiscreteDenoiser`).

    Args:
        min_snr_gamma: None for uniform weights, else the Min-SNR gamma (5 in the paper).
        offset_noise: strength of the per-(sample, channel) offset noise (0 = off; ~0.1 is usual).
    """

    def __init__(self, min_snr_gamma: float | None = None, offset_noise: float = 0.0) -> None:
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ConfigError(f"model.min_snr_gamma: expected null or a number > 0, got {min_snr_gamma!r}")
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = float(offset_noise)

    def noise(self, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Standard normal noise like x0, plus `offset_noise` x N(0, 1) per (sample, channel)."""
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.offset_noise > 0:
            shape = (x0.shape[0], x0.shape[1], *([1] * (x0.ndim - 2)))
            noise = noise + self.offset_noise * torch.randn(shape, generator=generator, device=x0.device,
                                                            dtype=x0.dtype)  # fmt: skip
        return noise

    def prepare(
        self, denoiser: Any, x0: torch.Tensor, generator: torch.Generator | None = None
    ) -> NoisedBatch:
        """Draw t, then noise (in that order, from `generator`), and build x_t, the target and the weights."""
        alphas_cumprod = denoiser.schedule.alphas_cumprod.to(x0.device)
        t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), generator=generator, device=x0.device)
        noise = self.noise(x0, generator)
        alpha_bar = append_dims(alphas_cumprod[t].to(x0.dtype), x0.ndim)
        alpha, sigma_vp = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x_t = alpha * x0 + sigma_vp * noise
        target = regression_target(denoiser.prediction, x0, noise, alpha, sigma_vp)
        if self.min_snr_gamma is None:
            weight = torch.ones(x0.shape[0], device=x0.device)
        else:
            bar = alphas_cumprod[t].float()
            weight = min_snr_weight(bar / (1 - bar), self.min_snr_gamma, denoiser.prediction)
        return NoisedBatch(x_t, t, target, weight)

    @staticmethod
    def weighted(prediction: torch.Tensor, batch: NoisedBatch) -> torch.Tensor:
        """weight x per-sample MSE (B,), computed in float32 whatever the model's dtype."""
        per_sample = F.mse_loss(prediction.float(), batch.target.float(), reduction="none")
        return per_sample.reshape(per_sample.shape[0], -1).mean(dim=1) * batch.weight.float()

    def __call__(
        self, denoiser: Any, x0: torch.Tensor, cond: dict[str, Any] | None = None,
        generator: torch.Generator | None = None, teacher: Any = None,
    ) -> torch.Tensor:  # fmt: skip
        """Per-sample losses (B,) of `denoiser.net(x_t, t, **cond)` on clean samples x0 (B, C, H, W)."""
        batch = self.prepare(denoiser, x0, generator)
        if teacher is not None:
            batch.target = teacher.net(batch.x_t, batch.t, **(cond or {})).detach()
        return self.weighted(denoiser.net(batch.x_t, batch.t, **(cond or {})), batch)


# ------------------------------------------------------------------------------------------------ EDM


def sample_lognormal_sigmas(
    batch: int,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """sigma (batch,) float32 with ln(sigma) ~ N(p_mean, p_std^2) (Karras et al. 2022, Table 1 training)."""
    normal = torch.randn(batch, generator=generator, device=_device_of(generator, torch.device(device)))
    return (normal * p_std + p_mean).exp().to(device)


class EDMLoss:
    """EDM training loss: sigma ~ lognormal(p_mean, p_std), loss = lambda(sigma) * err(D(x0 + sigma n), x0).

    As in NeMo, sqrt(lambda) scales prediction and target before the error function, so `l2` is exactly the
    paper's lambda * ||D - x0||^2 and `l1` / `huber` are the same errors measured on F's unit-variance scale.
    """

    def __init__(
        self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5, loss_type: str = "l2"
    ) -> None:
        _check_loss_type(loss_type)
        self.p_mean, self.p_std, self.sigma_data, self.loss_type = p_mean, p_std, sigma_data, loss_type

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, shaped like sigma."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def sample_sigmas(self, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Training noise levels (B,) in x0's compute dtype."""
        sigma = sample_lognormal_sigmas(x0.shape[0], self.p_mean, self.p_std, generator, x0.device)
        return sigma.to(dtype=compute_dtype(x0))

    def __call__(
        self, denoiser: Any, x0: torch.Tensor, cond: dict[str, Any] | None = None,
        generator: torch.Generator | None = None, teacher: Any = None, sigma: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Per-sample losses (B,) of the EDM-preconditioned `denoiser`; `sigma` / `noise` override the random
        draws (tests, evaluation at fixed levels)."""
        sigma = self.sample_sigmas(x0, generator) if sigma is None else sigma.to(x0.device, compute_dtype(x0))
        noise = noise_like(x0, generator) if noise is None else noise
        x_noisy = x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * noise
        target = x0 if teacher is None else teacher(x_noisy, sigma, cond).detach()
        denoised = denoiser(x_noisy, sigma, cond)
        root_weight = append_dims(self.weight(sigma).sqrt(), x0.ndim)
        return regression_loss(root_weight * denoised, root_weight * target, self.loss_type)


# ------------------------------------------------------------------------------------------ continuous DDPM


class ContinuousDDPMLoss:
    """Continuous-time DDPM loss on the log-SNR schedule of a `ContinuousDDPMDenoiser`: t ~ U(0, 1) per sample,
    z_t = alpha x0 + sigma_vp eps, the backbone regresses the denoiser's prediction type (eps, x0 or v) with an
    unweighted l1 / l2 / huber error (NeMo's `ContinousDDPMPrecond.compute_loss`)."""

    def __init__(self, loss_type: str = "l2") -> None:
        _check_loss_type(loss_type)
        self.loss_type = loss_type

    def __call__(
        self, denoiser: Any, x0: torch.Tensor, cond: dict[str, Any] | None = None,
        generator: torch.Generator | None = None, teacher: Any = None, t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Per-sample losses (B,); `t` / `noise` override the random draws."""
        if t is None:
            t = torch.rand(x0.shape[0], generator=generator, device=_device_of(generator, x0.device))
        t = t.to(x0.device, torch.float32)
        noise = noise_like(x0, generator) if noise is None else noise
        logsnr = denoiser.schedule.logsnr(t)
        alpha, sigma_vp = (append_dims(c, x0.ndim).to(x0.dtype) for c in vp_coefficients(logsnr))
        z_t = alpha * x0 + sigma_vp * noise
        time_cond = denoiser.condition(logsnr, t)
        if teacher is None:
            target = regression_target(denoiser.prediction, x0, noise, alpha, sigma_vp)
        else:
            target = teacher.net(z_t, time_cond, **(cond or {})).detach()
        return regression_loss(denoiser.net(z_t, time_cond, **(cond or {})), target, self.loss_type)


# ------------------------------------------------------------------------------------------ rectified flow

# diffusers' `weighting_scheme` names (train_dreambooth_sd3 / _flux): the first two pick the density of the
# times, the next two the loss weight of uniformly drawn times, `none` is uniform and unweighted.
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


def sample_flow_times(
    batch: int,
    weighting_scheme: str = "none",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Unshifted times u (batch,) float32 in [0, 1] from SD3's training densities (Esser et al. 2024, sec. 3.1):
    `logit_normal` sigmoid(N(mean, std^2)); `mode` 1 - u - s (cos^2(pi u / 2) - 1 + u) of u ~ U(0, 1) (mode
    sampling with heavy tails); otherwise U(0, 1). The draws are diffusers' `compute_density_for_timestep_sampling`
    ones, one for one."""
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ConfigError(
            f"model.loss.weighting_scheme: {weighting_scheme!r} is not one of {', '.join(WEIGHTING_SCHEMES)}"
        )
    where = _device_of(generator, torch.device(device))
    if weighting_scheme == "logit_normal":
        u = torch.normal(logit_mean, logit_std, size=(batch,), generator=generator, device=where).sigmoid()
    else:
        u = torch.rand(batch, generator=generator, device=where)
        if weighting_scheme == "mode":
            u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u.to(device)


def flow_loss_weight(t: torch.Tensor, weighting_scheme: str = "none") -> torch.Tensor:
    """SD3's loss weight at flow times t (shaped like t; diffusers' `compute_loss_weighting_for_sd3`): `sigma_sqrt`
    t^-2, `cosmap` 2 / (pi (1 - 2t + 2t^2)), otherwise 1."""
    if weighting_scheme == "sigma_sqrt":
        return t.float() ** -2.0
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * t + 2 * t**2))
    return torch.ones_like(t)


class FlowMatchingLoss:
    """Rectified-flow loss of a `FlowDenoiser`'s backbone: weight(t) x err(v(z_t, t), eps - x0), per sample.

    t = schedule.shifted(u) with u from `sample_flow_times` (Flux's dynamic shift takes mu from the latent's
    token count, x0 (B, C, H, W) packed into `patch_size` patches), clamped to [1 / T, 1]. With `teacher=` the
    target is the teacher backbone's velocity at the same (z_t, t).

    Args:
        schedule: the model's `FlowSchedule` (shift, dynamic shifting), shared with its sampling plan.
        weighting_scheme: diffusers' name (`none`, `logit_normal`, `mode`, `sigma_sqrt`, `cosmap`).
        logit_mean, logit_std, mode_scale: the densities' parameters (SD3: 0, 1, 1.29).
        patch_size: side of the latent patch one transformer token covers (Flux: 2).
        loss_type: `l2` (the papers'), `l1` or `huber`.
    """

    def __init__(
        self,
        schedule: FlowSchedule | None = None,
        weighting_scheme: str = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        patch_size: int = 2,
        loss_type: str = "l2",
    ) -> None:
        _check_loss_type(loss_type)
        sample_flow_times(1, weighting_scheme)  # validates the name
        self.schedule = schedule or FlowSchedule()
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = float(logit_mean), float(logit_std), float(mode_scale)
        self.patch_size = int(patch_size)
        self.loss_type = loss_type

    def sample_times(self, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Training times t (B,) float32, shifted as the schedule says, in [1 / T, 1]."""
        u = sample_flow_times(
            x0.shape[0], self.weighting_scheme, self.logit_mean, self.logit_std, self.mode_scale, generator,
            x0.device,
        )  # fmt: skip
        mu = None
        if self.schedule.use_dynamic_shifting:
            mu = self.schedule.mu(image_seq_len(x0.shape[-2], x0.shape[-1], self.patch_size))
        t = self.schedule.shifted(u.double(), mu)
        return t.clamp(1 / self.schedule.num_train_timesteps, 1).float()

    def __call__(
        self, denoiser: Any, x0: torch.Tensor, cond: dict[str, Any] | None = None,
        generator: torch.Generator | None = None, teacher: Any = None, t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Per-sample losses (B,) float32; `t` (B,) / `noise` override the random draws (t first, then noise)."""
        t = self.sample_times(x0, generator) if t is None else t.to(x0.device, torch.float32)
        noise = noise_like(x0, generator) if noise is None else noise
        t_b = append_dims(t, x0.ndim).to(x0.dtype)
        z_t = (1 - t_b) * x0 + t_b * noise
        if teacher is None:
            target = noise - x0
        else:
            target = teacher.velocity(z_t, t, cond).detach()
        prediction = denoiser.velocity(z_t, t, cond)
        root_weight = append_dims(flow_loss_weight(t, self.weighting_scheme).sqrt(), x0.ndim)
        return regression_loss(
            root_weight * prediction.float(), root_weight * target.float(), self.loss_type
        )
