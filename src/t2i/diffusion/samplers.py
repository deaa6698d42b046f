"""Samplers as plain functions of (denoiser, x, sigmas), after k-diffusion (Karras et al. 2022).

Every sampler has the signature
    sample_NAME(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, progress=False, **options) -> x
where `denoiser(x, sigma (B,), cond) -> x0_hat` works on the VE scale `x = x0 + sigma eps`, `x` (B, ...) enters
already scaled to `sigmas[0]`, and `sigmas` (n + 1,) is decreasing; the result is the sample at `sigmas[-1]`.
`callback(i, sigma, x, x0)` runs after each model evaluation of step i. All noise comes from `generator`.

The algorithms match diffusers' schedulers step for step when driven by `t2i.diffusion.plans.make_plan`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import trange

from t2i.errors import InvalidInputError, UnknownSamplerError


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


Generators = torch.Generator | Sequence[torch.Generator]


def draw_noise(
    shape: Sequence[int],
    generator: Generators | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn on the generator's device (else `device`) so seeds reproduce
    across devices.

    `generator` may be a list with one generator per row (shape[0] of them, as diffusers accepts): row i is then
    drawn from generator i alone, exactly as a batch of one would draw it, so a row's noise does not depend on
    the rows batched with it.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise InvalidInputError(
                f"generator: {len(generator)} generators for a batch of {shape[0]}; expected one per row"
            )
        rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.stack([row.to(rows[0].device) for row in rows])
    device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def noise_like(x: torch.Tensor, generator: Generators | None) -> torch.Tensor:
    """Standard normal noise shaped like x (one generator, or one per row of x: see `draw_noise`)."""
    return draw_noise(x.shape, generator, x.dtype, x.device).to(x.device)


def add_noise(
    x: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None, s_noise: float = 1.0
) -> torch.Tensor:
    """x plus fresh Gaussian noise of standard deviation s_noise * std."""
    return x + noise_like(x, generator) * s_noise * std


def _batch_sigma(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Scalar sigma -> (B,) on x's device and dtype."""
    return sigma.to(device=x.device, dtype=x.dtype) * x.new_ones(x.shape[0])


class StepDenoiser:
    """The denoiser as a sampler calls it: at one scalar sigma, with each step's main evaluation shown to the
    callback.

    `batch_sigma(sigma, x) -> (B,)` turns the scalar into the denoiser's sigma argument; samplers written for a
    particular denoiser family pass their own, so the dtype the denoiser sees stays theirs.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        cond: dict | None,
        callback: Callback | None,
        batch_sigma: Callable[[Any, torch.Tensor], torch.Tensor] = _batch_sigma,
    ) -> None:
        self.denoiser, self.cond, self.callback, self.batch_sigma = denoiser, cond, callback, batch_sigma

    def __call__(self, x: torch.Tensor, sigma: Any) -> torch.Tensor:
        return self.denoiser(x, self.batch_sigma(sigma, x), self.cond)

    def step(self, i: int, x: torch.Tensor, sigma: Any, at: Any = None) -> torch.Tensor:
        """x0_hat of step i, reported as callback(i, sigma, x, x0_hat). `at` evaluates the model at another level
        than the step's nominal sigma (the raised sigma_hat of a churned step)."""
        denoised = self(x, sigma if at is None else at)
        if self.callback is not None:
            self.callback(i, sigma, x, denoised)
        return denoised


def sigma_steps(sigmas: Sequence[Any], progress: bool) -> Iterator[tuple[int, Any, Any]]:
    """(i, sigma_i, sigma_{i+1}) for every step, with a tqdm progress bar when `progress`."""
    for i in trange(len(sigmas) - 1, disable=not progress):
        yield i, sigmas[i], sigmas[i + 1]


def _prepare(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(sigmas, device=x.device).to(
        torch.float64 if x.dtype == torch.float64 else torch.float32
    )


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE, (x - D(x)) / sigma (Karras et al. 2022, eq. 4)."""
    return (x - denoised) / sigma


def euler_step(
    x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, denoised: torch.Tensor
) -> torch.Tensor:
    """One Euler step of the probability-flow ODE from sigma to sigma_next, given D(x, sigma)."""
    return x + to_d(x, sigma, denoised) * (sigma_next - sigma)


def heun_step(
    denoise: StepDenoiser,
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    denoised: torch.Tensor,
) -> torch.Tensor:
    """Heun's second-order step of the probability-flow ODE (Karras et al. 2022, Alg. 2 lines 5-8): the Euler
    step, corrected with the derivative at its end. A step to sigma_next = 0 stays Euler, as the derivative
    (x - D) / sigma is undefined there."""
    d = to_d(x, sigma, denoised)
    dt = sigma_next - sigma
    x_euler = x + d * dt
    if sigma_next == 0:
        return x_euler
    d_next = to_d(x_euler, sigma_next, denoise(x_euler, sigma_next))
    return x + (d + d_next) / 2 * dt


@dataclass(frozen=True)
class Churn:
    """Stochastic "churn" of Karras et al. 2022, Alg. 2 (lines 3-4): before a step, raise sigma_i to
    sigma_hat = (1 + gamma) sigma_i with fresh noise of std s_noise * sqrt(sigma_hat^2 - sigma_i^2), where
    gamma = min(s_churn / steps, sqrt(2) - 1) for sigma_i in [s_tmin, s_tmax] and 0 elsewhere."""

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0

    def gamma(self, sigma: torch.Tensor, steps: int) -> float:
        if self.s_churn <= 0 or not self.s_tmin <= float(sigma) <= self.s_tmax:
            return 0.0
        return min(self.s_churn / steps, 2**0.5 - 1)

    def apply(
        self, x: torch.Tensor, sigma: torch.Tensor, steps: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, sigma_hat); without churn x is returned unchanged and no random numbers are drawn."""
        gamma = self.gamma(sigma, steps)
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            x = add_noise(x, (sigma_hat**2 - sigma**2).sqrt(), generator, self.s_noise)
        return x, sigma_hat


def churned_ode_loop(
    denoise: StepDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    churn: Churn,
    generator: torch.Generator | None,
    progress: bool,
    *,
    second_order: bool,
) -> torch.Tensor:
    """Karras et al. 2022, Alg. 2: per step, churn, evaluate at sigma_hat, then an Euler (or, with
    `second_order`, a Heun) step to sigma_{i+1}. The callback sees the step's nominal sigma_i."""
    steps = len(sigmas) - 1
    for i, sigma, sigma_next in sigma_steps(sigmas, progress):
        x, sigma_hat = churn.apply(x, sigma, steps, generator)
        denoised = denoise.step(i, x, sigma, at=sigma_hat)
        if second_order:
            x = heun_step(denoise, x, sigma_hat, sigma_next, denoised)
        else:
            x = euler_step(x, sigma_hat, sigma_next, denoised)
    return x


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


def _landing_sigmas(
    x: torch.Tensor, sigmas: torch.Tensor, sigmas_to: Sequence[float] | torch.Tensor | None
) -> torch.Tensor:
    """Where each DDIM/PLMS step lands: `sigmas_to` when given (see `sample_ddim`), else the next grid level."""
    return sigmas[1:] if sigmas_to is None else _prepare(x, sigmas_to)


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
    denoise, churn = StepDenoiser(denoiser, cond, callback), Churn(s_churn, s_tmin, s_tmax, s_noise)
    return churned_ode_loop(denoise, x, _prepare(x, sigmas), churn, generator, progress, second_order=False)


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
    sigmas, denoise = _prepare(x, sigmas), StepDenoiser(denoiser, cond, callback)
    for i, sigma, sigma_next in sigma_steps(sigmas, progress):
        denoised = denoise.step(i, x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = euler_step(x, sigma, sigma_down, denoised)
        if sigma_next > 0:
            x = add_noise(x, sigma_up, generator, s_noise)
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
    denoise, churn = StepDenoiser(denoiser, cond, callback), Churn(s_churn, s_tmin, s_tmax, s_noise)
    return churned_ode_loop(denoise, x, _prepare(x, sigmas), churn, generator, progress, second_order=True)


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
    sigmas, denoise = _prepare(x, sigmas), StepDenoiser(denoiser, cond, callback)
    sigma_list = sigmas.double().cpu().tolist()
    derivatives: list[torch.Tensor] = []
    for i, sigma, _ in sigma_steps(sigmas, progress):
        denoised = denoise.step(i, x, sigma)
        derivatives = [to_d(x, sigma, denoised), *derivatives][:order]
        current_order = min(i + 1, order)
        coeffs = [lms_coefficient(sigma_list, i, current_order, j) for j in range(current_order)]
        x = x + sum(c * d for c, d in zip(coeffs, derivatives))
    return x


# ------------------------------------------------------------------------------------------ DPM-Solver++


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR on the VE scale: lambda = -log(sigma)."""
    return -sigma.log()


def _second_order_ready(old_denoised: torch.Tensor | None, i: int, n: int, euler_at_final: bool) -> bool:
    """Whether DPM-Solver++(2M) step i of n may use the previous x0: not on the first step, nor on the last one
    when `euler_at_final` asks for first order there."""
    return old_denoised is not None and not (euler_at_final and i == n - 1)


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
    sigmas, denoise = _prepare(x, sigmas), StepDenoiser(denoiser, cond, callback)
    n = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in sigma_steps(sigmas, progress):
        denoised = denoise.step(i, x, sigma)
        if sigma_next == 0:
            x = denoised
            continue
        h = _lambda(sigma_next) - _lambda(sigma)
        x0_estimate = denoised
        if _second_order_ready(old_denoised, i, n, euler_at_final):
            r = h_last / h
            x0_estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - torch.expm1(-h) * x0_estimate
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
    sigmas, denoise = _prepare(x, sigmas), StepDenoiser(denoiser, cond, callback)
    n = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in sigma_steps(sigmas, progress):
        denoised = denoise.step(i, x, sigma)
        # drawn on every step, the last included, so the generator advances as in k-diffusion and diffusers
        noise = noise_like(x, generator)
        if sigma_next == 0:
            x = denoised
            continue
        h = _lambda(sigma_next) - _lambda(sigma)
        eta_h = eta * h
        x = (sigma_next / sigma) * (-eta_h).exp() * x - torch.expm1(-h - eta_h) * denoised
        if _second_order_ready(old_denoised, i, n, euler_at_final):
            r = h_last / h
            x = x - 0.5 * torch.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
        if eta > 0:
            x = x + noise * sigma_next * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise
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
    sigmas, denoise = _prepare(x, sigmas), StepDenoiser(denoiser, cond, callback)
    targets = _landing_sigmas(x, sigmas, sigmas_to)
    for i, sigma, sigma_next in sigma_steps(sigmas, progress):
        target = targets[i]
        denoised = denoise.step(i, x, sigma)
        eps = to_d(x, sigma, denoised)
        _, std = ancestral_step(sigma, target, eta)
        x = denoised + (target**2 - std**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            # diffusers' operand order (std * noise): half-precision CPU kernels round the two orders differently
            x = x + std * noise_like(x, generator)
        x = _vp_rescale(x, target, sigma_next)
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
    sigmas, denoise = _prepare(x, sigmas), StepDenoiser(denoiser, cond, callback)
    n = len(sigmas) - 1
    targets = _landing_sigmas(x, sigmas, sigmas_to)
    as_output = _to_v if multistep_space == "v" else to_d

    def ddim_jump(
        x_: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        eps = _v_to_eps(out, x_, sigma) if as_output is _to_v else out
        return x_ + (target - sigma) * eps

    history: list[torch.Tensor] = []
    for i, sigma, sigma_next in sigma_steps(sigmas, progress):
        out = as_output(x, sigma, denoise.step(i, x, sigma))
        history = [out, *history][:4]
        if i == 0 and n > 1:
            x_pred = _vp_rescale(ddim_jump(x, sigma, targets[0], out), targets[0], sigma_next)
            out_pred = as_output(x_pred, sigma_next, denoise(x_pred, sigma_next))
            start = sigma if sigma_correct_from is None else torch.as_tensor(sigma_correct_from).to(sigma)
            x_start = _vp_rescale(x, sigma, start)
            x = ddim_jump(x_start, start, sigma_next, (out + out_pred) / 2)
            continue
        x = _vp_rescale(ddim_jump(x, sigma, targets[i], _plms_combine(history)), targets[i], sigma_next)
    return x


def available_samplers() -> list[str]:
    """Names of every registered sampler, sorted."""
    _load_builtin_samplers()
    return sorted(SAMPLERS)


def _load_builtin_samplers() -> None:
    """Import the modules whose samplers live beside their denoisers; they register on import.

    Done lazily because edm.py and continuous.py import this module.
    """
    import t2i.diffusion.continuous
    import t2i.diffusion.edm  # noqa: F401
