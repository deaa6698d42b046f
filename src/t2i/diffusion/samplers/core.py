"""What every sampler shares: the step-wise view of the denoiser, the ODE derivative, Euler and Heun steps,
Karras' churn, ancestral step sizes and the VP rescaling diffusers' DDIM/PNDM grids need."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from t2i.diffusion.tensors import batch_sigma, compute_dtype
from t2i.errors import SamplingError

if TYPE_CHECKING:
    from t2i.diffusion.samplers.registry import SamplerRun


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any] | None) -> torch.Tensor: ...


Callback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class StepDenoiser:
    """The denoiser as a sampler calls it: at one scalar sigma (passed as a (B,) tensor in the compute dtype),
    with each step's main evaluation checked for non-finite values and shown to the callback."""

    def __init__(self, denoiser: Denoiser, cond: dict | None, callback: Callback | None) -> None:
        self.denoiser, self.cond, self.callback = denoiser, cond, callback

    def __call__(self, x: torch.Tensor, sigma: Any) -> torch.Tensor:
        return self.denoiser(x, batch_sigma(sigma, x), self.cond)

    def step(self, i: int, x: torch.Tensor, sigma: Any, at: Any = None) -> torch.Tensor:
        """x0_hat of step i, reported as callback(i, sigma, x, x0_hat). `at` evaluates the model at another level
        than the step's nominal sigma (the raised sigma_hat of a churned step)."""
        denoised = self(x, sigma if at is None else at)
        if not bool(torch.isfinite(denoised).all()):
            raise SamplingError(
                f"sampling: the model's estimate became non-finite (NaN or inf) at step {i} (sigma "
                f"{float(sigma):.4g}); check the guidance scale, LoRA weights and the weight dtype"
            )
        if self.callback is not None:
            self.callback(i, sigma, x, denoised)
        return denoised


def prepare_sigmas(x: torch.Tensor, sigmas: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """sigmas on x's device in the compute dtype (float64 for float64 x, else float32)."""
    return torch.as_tensor(sigmas, device=x.device).to(compute_dtype(x))


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE, (x - D(x)) / sigma (Karras et al. 2022, eq. 4)."""
    return (x - denoised) / sigma


def euler_step(
    x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, denoised: torch.Tensor
) -> torch.Tensor:
    """One Euler step of the probability-flow ODE from sigma to sigma_next, given D(x, sigma).

    Written as D + (sigma_next / sigma)(x - D), which equals x + (x - D) / sigma * (sigma_next - sigma) but stays
    exact from a huge sigma (a flow model's t = 1, `FLOW_SIGMA_AT_ONE`), where the textbook form cancels two
    numbers of size sigma."""
    return denoised + (x - denoised) * (sigma_next / sigma)


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
        self, run: SamplerRun, x: torch.Tensor, sigma: torch.Tensor, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, sigma_hat); without churn x is returned unchanged and no random numbers are drawn."""
        gamma = self.gamma(sigma, steps)
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            x = run.add_noise(x, (sigma_hat**2 - sigma**2).sqrt(), self.s_noise)
        return x, sigma_hat


def churned_ode_loop(
    run: SamplerRun, x: torch.Tensor, sigmas: torch.Tensor, churn: Churn, *, second_order: bool
) -> torch.Tensor:
    """Karras et al. 2022, Alg. 2: per step, churn, evaluate at sigma_hat, then an Euler (or, with
    `second_order`, a Heun) step to sigma_{i+1}. The callback sees the step's nominal sigma_i."""
    steps = len(sigmas) - 1
    for i, sigma, sigma_next in run.steps(sigmas):
        x, sigma_hat = churn.apply(run, x, sigma, steps)
        denoised = run.denoise.step(i, x, sigma, at=sigma_hat)
        if second_order:
            x = heun_step(run.denoise, x, sigma_hat, sigma_next, denoised)
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


def vp_rescale(x: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    """Reinterpret a VE sample at sigma_from as one at sigma_to keeping its VP value x / sqrt(1 + sigma^2) fixed.

    diffusers' DDIM/PNDM step to `t - T // steps`, which off the `leading` grid is not the next timestep; the
    sample is then simply read at the next timestep. This reproduces that.
    """
    if sigma_from is sigma_to or bool(sigma_from == sigma_to):
        return x
    return x * ((1 + sigma_to**2) / (1 + sigma_from**2)).sqrt()


def landing_sigmas(
    x: torch.Tensor, sigmas: torch.Tensor, sigmas_to: Sequence[float] | torch.Tensor | None
) -> torch.Tensor:
    """Where each DDIM/PLMS step lands: `sigmas_to` when given (see `sample_ddim`), else the next grid level."""
    return sigmas[1:] if sigmas_to is None else prepare_sigmas(x, sigmas_to)
