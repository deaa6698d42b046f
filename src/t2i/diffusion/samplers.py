"""Samplers as plain functions of (denoiser, x, sigmas), after k-diffusion (Karras et al. 2022).

Every sampler has the signature
    sample_NAME(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, progress=False, **options) -> x
where `denoiser(x, sigma (B,), cond) -> x0_hat` works on the VE scale `x = x0 + sigma eps`, `x` (B, ...) enters
already scaled to `sigmas[0]`, and `sigmas` (n + 1,) is decreasing; the result is the sample at `sigmas[-1]`.
`callback(i, sigma, x, x0)` runs after each model evaluation of step i. All noise comes from `generator`.

The algorithms match diffusers' schedulers step for step when driven by `t2i.diffusion.plans.make_plan`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import trange

from t2i.errors import UnknownSamplerError


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any] | None) -> torch.Tensor: ...


Callback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
SamplerFn = Callable[..., torch.Tensor]

SAMPLERS: dict[str, SamplerFn] = {}


def register_sampler(name: str) -> Callable[[SamplerFn], SamplerFn]:
    """Decorator adding a sampler function to `SAMPLERS` under `name`."""

    def add(fn: SamplerFn) -> SamplerFn:
        SAMPLERS[name] = fn
        return fn

    return add


def get_sampler(name: str) -> SamplerFn:
    """The sampler function registered as `name`; raises UnknownSamplerError listing the valid names."""
    _load_builtin_samplers()
    if name not in SAMPLERS:
        raise UnknownSamplerError(
            f"sampler: unknown name {name!r}; valid samplers: {', '.join(sorted(SAMPLERS))}"
        )
    return SAMPLERS[name]


# ----------------------------------------------------------------------------------------------- helpers


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device so seeds reproduce across devices."""
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    return noise.to(x.device)


def _batch_sigma(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Scalar sigma -> (B,) on x's device and dtype."""
    return sigma.to(device=x.device, dtype=x.dtype) * x.new_ones(x.shape[0])


def _denoise(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None) -> torch.Tensor:
    return denoiser(x, _batch_sigma(sigma, x), cond)


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE, (x - D(x)) / sigma (Karras et al. 2022, eq. 4)."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0) -> tuple[Any, Any]:
    """(sigma_down, sigma_up): deterministic target and fresh-noise std of an ancestral step (DDPM posterior
    when eta = 1, DDIM when eta = 0)."""
    if eta == 0 or sigma_to == 0:
        return sigma_to, sigma_to * 0
    sigma_up = torch.minimum(
        sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2).sqrt()
    )
    return (sigma_to**2 - sigma_up**2).sqrt(), sigma_up


def _vp_rescale(x: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    """Reinterpret a VE sample at sigma_from as one at sigma_to keeping its VP value x / sqrt(1 + sigma^2) fixed.

    diffusers' DDIM/PNDM step to `t - T // steps`, which off the `leading` grid is not the next timestep; the sample
    is then simply read at the next timestep. This reproduces that.
    """
    if sigma_from is sigma_to or bool(sigma_from == sigma_to):
        return x
    return x * ((1 + sigma_to**2) / (1 + sigma_from**2)).sqrt()


def _steps(sigmas: torch.Tensor, progress: bool) -> range:
    return trange(len(sigmas) - 1, disable=not progress)


def _prepare(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(sigmas, device=x.device).to(
        torch.float64 if x.dtype == torch.float64 else torch.float32
    )


# ---------------------------------------------------------------------------------- Euler family (ODE/SDE)


@register_sampler("euler")
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: dict | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler steps of the probability-flow ODE, with optional churn (Karras et al. 2022, Alg. 2)."""
    sigmas = _prepare(x, sigmas)
    for i in _steps(sigmas, progress):
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + _noise_like(x, generator) * s_noise * (sigma_hat**2 - sigmas[i] ** 2).sqrt()
        denoised = _denoise(denoiser, x, sigma_hat, cond)
        if callback is not None:
            callback(i, sigmas[i], x, denoised)
        x = x + to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
    return x


@register_sampler("euler_ancestral")
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: dict | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler step to sigma_down, then fresh noise of std sigma_up (k-diffusion `sample_euler_ancestral`)."""
    sigmas = _prepare(x, sigmas)
    for i in _steps(sigmas, progress):
        denoised = _denoise(denoiser, x, sigmas[i], cond)
        if callback is not None:
            callback(i, sigmas[i], x, denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + _noise_like(x, generator) * s_noise * sigma_up
    return x


@register_sampler("heun")
def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: dict | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 2); the last step to sigma = 0 is plain Euler."""
    sigmas = _prepare(x, sigmas)
    for i in _steps(sigmas, progress):
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + _noise_like(x, generator) * s_noise * (sigma_hat**2 - sigmas[i] ** 2).sqrt()
        denoised = _denoise(denoiser, x, sigma_hat, cond)
        if callback is not None:
            callback(i, sigmas[i], x, denoised)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
            continue
        x_euler = x + d * dt
        d_next = to_d(x_euler, sigmas[i + 1], _denoise(denoiser, x_euler, sigmas[i + 1], cond))
        x = x + (d + d_next) / 2 * dt
    return x


def lms_coefficient(sigmas: Sequence[float], i: int, order: int, j: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial through sigma_i..sigma_{i-order+1}
    that is 1 at sigma_{i-j} (linear multistep, Karras et al. 2022 / k-diffusion `linear_multistep_coeff`)."""
    nodes = [float(sigmas[i - k]) for k in range(order)]
    basis = np.polynomial.Polynomial([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            basis = basis * np.polynomial.Polynomial([-node, 1.0]) / (nodes[j] - node)
    antiderivative = basis.integ()
    return float(antiderivative(float(sigmas[i + 1])) - antiderivative(float(sigmas[i])))


@register_sampler("lms")
def sample_lms(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: dict | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    order: int = 4,
) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth in sigma) on the ODE derivatives, order up to `order`."""
    sigmas = _prepare(x, sigmas)
    sigma_list = sigmas.double().cpu().tolist()
    derivatives: list[torch.Tensor] = []
    for i in _steps(sigmas, progress):
        denoised = _denoise(denoiser, x, sigmas[i], cond)
        if callback is not None:
            callback(i, sigmas[i], x, denoised)
        derivatives = [to_d(x, sigmas[i], denoised), *derivatives][:order]
        current_order = min(i + 1, order)
        coeffs = [lms_coefficient(sigma_list, i, current_order, j) for j in range(current_order)]
        x = x + sum(c * d for c, d in zip(coeffs, derivatives))
    return x


# ------------------------------------------------------------------------------------------ DPM-Solver++


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR on the VE scale: lambda = -log(sigma)."""
    return -sigma.log()


@register_sampler("dpmpp_2m")
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: dict | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    euler_at_final: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M), multistep second order in x0 (Lu et al. 2022, Alg. 2). First and final steps are first
    order (`euler_at_final` forces that for a final sigma > 0, as diffusers' `lower_order_final` does)."""
    sigmas = _prepare(x, sigmas)
    n = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in _steps(sigmas, progress):
        denoised = _denoise(denoiser, x, sigmas[i], cond)
        if callback is not None:
            callback(i, sigmas[i], x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h = _lambda(sigmas[i + 1]) - _lambda(sigmas[i])
        if old_denoised is None or (euler_at_final and i == n - 1):
            x0_estimate = denoised
        else:
            r = h_last / h
            x0_estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * x0_estimate
        old_denoised, h_last = denoised, h
    return x


@register_sampler("dpmpp_2m_sde")
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: dict | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    eta: float = 1.0,
    s_noise: float = 1.0,
    euler_at_final: bool = False,
) -> torch.Tensor:
    """SDE variant of DPM-Solver++(2M) (Lu et al. 2022, sec. 5; midpoint form of k-diffusion and diffusers)."""
    sigmas = _prepare(x, sigmas)
    n = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in _steps(sigmas, progress):
        denoised = _denoise(denoiser, x, sigmas[i], cond)
        if callback is not None:
            callback(i, sigmas[i], x, denoised)
        noise = _noise_like(x, generator)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h = _lambda(sigmas[i + 1]) - _lambda(sigmas[i])
        eta_h = eta * h
        x = (sigmas[i + 1] / sigmas[i]) * (-eta_h).exp() * x - torch.expm1(-h - eta_h) * denoised
        if old_denoised is not None and not (euler_at_final and i == n - 1):
            r = h_last / h
            x = x - 0.5 * torch.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
        if eta > 0:
            x = x + noise * sigmas[i + 1] * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


# ---------------------------------------------------------------------------------- DDPM / DDIM / PLMS


@register_sampler("ddpm")
def sample_ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: dict | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_s | x_t, x0_hat) with the `fixed_small` variance
    (Ho et al. 2020, eq. 7); on the VE scale the posterior mean is x0 + (sigma_s / sigma_t)^2 (x - x0)."""
    return sample_ddim(
        denoiser, x, sigmas, cond, generator=generator, callback=callback, progress=progress, eta=1.0
    )


@register_sampler("ddim")
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: dict | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    eta: float = 0.0,
    sigmas_to: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_next = x0 + sqrt(s_to^2 - std^2) eps + std z, with std = eta * the DDPM
    posterior std. eta = 0 is deterministic (and equals an Euler step on the VE scale).

    `sigmas_to` (n,), optional: where each step lands when that differs from `sigmas[i + 1]` (diffusers'
    `t - T // steps` off the `leading` grid); the sample is then read at `sigmas[i + 1]` unchanged in VP scale.
    """
    sigmas = _prepare(x, sigmas)
    targets = sigmas[1:] if sigmas_to is None else _prepare(x, sigmas_to)
    for i in _steps(sigmas, progress):
        sigma, target = sigmas[i], targets[i]
        denoised = _denoise(denoiser, x, sigma, cond)
        if callback is not None:
            callback(i, sigma, x, denoised)
        eps = to_d(x, sigma, denoised)
        _, std = ancestral_step(sigma, target, eta)
        x = denoised + (target**2 - std**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x = x + std * _noise_like(x, generator)
        x = _vp_rescale(x, target, sigmas[i + 1])
    return x


def _to_v(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The v-prediction a v-model would have output: v = (eps - sigma x0) / sqrt(1 + sigma^2)."""
    return (to_d(x, sigma, denoised) - sigma * denoised) / (1 + sigma**2).sqrt()


def _v_to_eps(v: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return v / (1 + sigma**2).sqrt() + sigma * x / (1 + sigma**2)


def _plms_combine(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth combination of the newest-first model outputs (Liu et al. 2022, PNDM eq. 12)."""
    weights = {
        1: [1.0],
        2: [3 / 2, -1 / 2],
        3: [23 / 12, -16 / 12, 5 / 12],
        4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
    }
    return sum(w * out for w, out in zip(weights[len(outputs)], outputs))


@register_sampler("plms")
def sample_plms(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: dict | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    sigmas_to: Sequence[float] | torch.Tensor | None = None,
    sigma_correct_from: float | None = None,
    multistep_space: str = "eps",
) -> torch.Tensor:
    """Pseudo linear multistep (PLMS, Liu et al. 2022) with diffusers' `skip_prk_steps` warm-up: the first step is
    a predictor-corrector pair (average of the outputs at both ends), later steps combine up to 4 past outputs.
    Each update is a DDIM step with the combined eps, so n steps take n + 1 model evaluations.

    Options reproducing diffusers' PNDMScheduler exactly: `sigmas_to` (n,) landing sigma of each step (see
    `sample_ddim`); `sigma_correct_from` the sigma the corrector restarts from; `multistep_space="v"` combines the
    raw v outputs instead of eps, as that scheduler does for v-prediction models.
    """
    sigmas = _prepare(x, sigmas)
    n = len(sigmas) - 1
    targets = sigmas[1:] if sigmas_to is None else _prepare(x, sigmas_to)
    use_v = multistep_space == "v"

    def output(x_: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        denoised = _denoise(denoiser, x_, sigma, cond)
        return (_to_v if use_v else to_d)(x_, sigma, denoised), denoised

    def ddim_jump(
        x_: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        eps = _v_to_eps(out, x_, sigma) if use_v else out
        return x_ + (target - sigma) * eps

    history: list[torch.Tensor] = []
    for i in _steps(sigmas, progress):
        sigma = sigmas[i]
        out, denoised = output(x, sigma)
        if callback is not None:
            callback(i, sigma, x, denoised)
        history = [out, *history][:4]
        if i == 0 and n > 1:
            x_pred = _vp_rescale(ddim_jump(x, sigma, targets[0], out), targets[0], sigmas[1])
            out_pred, _ = output(x_pred, sigmas[1])
            start = sigma if sigma_correct_from is None else torch.as_tensor(sigma_correct_from).to(sigma)
            x_start = _vp_rescale(x, sigma, start)
            x = ddim_jump(x_start, start, sigmas[1], (out + out_pred) / 2)
            continue
        x = _vp_rescale(ddim_jump(x, sigma, targets[i], _plms_combine(history)), targets[i], sigmas[i + 1])
    return x


def available_samplers() -> list[str]:
    """Names of every registered sampler, sorted."""
    _load_builtin_samplers()
    return sorted(SAMPLERS)


def _load_builtin_samplers() -> None:
    """Import the modules whose samplers live beside their denoisers; they register on import.

    Done lazily because edm.py and continuous.py import this module.
    """
    import t2i.diffusion.continuous  # noqa: F401
    import t2i.diffusion.edm  # noqa: F401
