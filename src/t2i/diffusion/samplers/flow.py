"""Samplers of the rectified-flow ODE dz/dt = v(z, t) in the flow's own coordinates, for what the VE-scale samplers
cannot reproduce: Heun's method averages velocities in t (diffusers' `FlowMatchHeunDiscreteScheduler`), which is
not Heun's method in sigma, and starts from t = 1, where the VE scale is infinite.

The contract is every sampler's: `x` enters on the VE scale at `sigmas[0]` and leaves at `sigmas[-1]`; inside,
z = x / (1 + sigma), t = sigma / (1 + sigma) and v = (z - D) / t, with D the denoiser's x0 estimate. (Flow Euler
needs no sampler of its own: an Euler step in t on z is the VE `euler` step, `t2i.diffusion.plans` says which.)
"""

from __future__ import annotations

import torch

from t2i.diffusion.samplers.core import StepDenoiser, prepare_sigmas
from t2i.diffusion.samplers.registry import SamplerRun, sampler


def flow_velocity(
    denoise: StepDenoiser, z: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor, step: int | None = None
) -> torch.Tensor:
    """v = (z - D(x, sigma)) / t at the flow sample z (B, ...) of time t; `step` reports the evaluation as that
    step's main one (non-finite check, callback)."""
    x = z * (1 + sigma)
    denoised = denoise(x, sigma) if step is None else denoise.step(step, x, sigma)
    return (z - denoised) / t


@sampler("flow_heun", prepare=False)
def sample_flow_heun(run: SamplerRun, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Heun's method in flow time: z_e = z + (t' - t) v(z, t), then z + (t' - t) (v(z, t) + v(z_e, t')) / 2; the
    step to t' = 0 stays Euler (diffusers' FlowMatchHeunDiscreteScheduler). n steps take 2n - 1 model
    evaluations when the last sigma is 0. Deterministic. Times come from the float64 sigmas."""
    wide = prepare_sigmas(x, sigmas)
    double = torch.as_tensor(sigmas, dtype=torch.float64)
    times = (double / (1 + double)).to(device=x.device, dtype=wide.dtype)
    z = x / (1 + wide[0])
    for i, sigma, sigma_next in run.steps(wide):
        t, t_next = times[i], times[i + 1]
        v = flow_velocity(run.denoise, z, sigma, t, step=i)
        z_euler = z + (t_next - t) * v
        if sigma_next == 0:
            z = z_euler
            continue
        v_next = flow_velocity(run.denoise, z_euler, sigma_next, t_next)
        z = z + (t_next - t) * (v + v_next) / 2
    return z * (1 + wide[-1])
