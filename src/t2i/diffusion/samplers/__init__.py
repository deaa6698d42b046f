"""Samplers as plain functions of (denoiser, x, sigmas), after k-diffusion (Karras et al. 2022).

Every sampler has the signature
    sample_NAME(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, progress=False, **options) -> x
where `denoiser(x, sigma (B,), cond) -> x0_hat` works on the VE scale `x = x0 + sigma eps`, `x` (B, ...) enters
already scaled to `sigmas[0]`, and `sigmas` (n + 1,) is decreasing; the result is the sample at `sigmas[-1]`.
`callback(i, sigma, x, x0)` runs after each model evaluation of step i. All noise comes from `generator` (one
generator, or one per batch row). A non-finite x0 estimate stops sampling with a `SamplingError`. A sampler is
written as a core over a `SamplerRun` and registered with `@sampler(name)` (`registry.py`).

Modules: `euler` (Euler, Euler ancestral, Heun with Karras' churn), `multistep` (LMS, DPM-Solver++ 2M and its SDE),
`posterior` (DDPM, DDIM, PLMS, continuous-time DDPM ancestral), `flow` (Heun in rectified-flow time). Importing this
package registers all of them.
The algorithms match diffusers' schedulers step for step when driven by `t2i.diffusion.plans.make_plan`.
"""

from t2i.diffusion.samplers import euler, flow, multistep, posterior  # noqa: F401  (they register on import)
from t2i.diffusion.samplers.core import Callback, Denoiser, StepDenoiser
from t2i.diffusion.samplers.registry import (
    SAMPLERS,
    SamplerRun,
    available_samplers,
    get_sampler,
    register_sampler,
    sampler,
)

__all__ = [
    "SAMPLERS",
    "Callback",
    "Denoiser",
    "SamplerRun",
    "StepDenoiser",
    "available_samplers",
    "get_sampler",
    "register_sampler",
    "sampler",
]
