"""Sampling plans: turn a diffusers scheduler config + a sampler name + a step count into the sigmas, scales and
options with which our samplers reproduce that diffusers scheduler's loop exactly.

Usage in a pipeline:
    plan = make_plan("euler", scheduler_config, steps=30)
    latents = plan.sample(denoiser, noise, cond, generator=g)   # = sampler(denoiser, noise * init, sigmas) * final

diffusers schedulers keep their sample either on the VP scale (DDIM, PNDM, DDPM, DPM-Solver: init_noise_sigma 1)
or on the VE scale (Euler, Heun, LMS: init_noise_sigma ~ sigma_max); `init_noise_scale` maps their initial latents
to our VE scale and `final_scale` maps our result back to what their loop returns.

Flow-matching configs (`FlowMatchEulerDiscreteScheduler`, `FlowMatchHeunDiscreteScheduler`: rectified-flow models
such as Flux and SD3) keep the flow sample z_t = x / (1 + sigma): `euler` is the VE Euler step (the same step in
other coordinates), `heun` is `flow_heun` (Heun's method in t), and every other sampler runs on the same times
with t capped at 1 - 1/T, where the VE scale is finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from t2i.diffusion.samplers import Callback, Denoiser, get_sampler
from t2i.diffusion.schedules import (
    DiscreteSchedule,
    FlowSchedule,
    flow_t_to_sigma,
    interpolate_sigmas,
    karras_sigmas,
    spaced_timesteps,
)
from t2i.diffusion.tensors import Generators
from t2i.errors import ConfigError, UnknownSamplerError

SCHEDULER_FOR_SAMPLER: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
}

_COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "timestep_spacing": "linspace",
}
# Per-class defaults diffusers applies when a key is missing from the config (e.g. SD 1.x's scheduler_config.json
# has no `timestep_spacing`, so DDIM reads it as `leading` and Euler as `linspace`).
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDPMScheduler": {"timestep_spacing": "leading", "variance_type": "fixed_small"},
    "DDIMScheduler": {"timestep_spacing": "leading", "set_alpha_to_one": True},
    "PNDMScheduler": {"timestep_spacing": "leading", "set_alpha_to_one": False},
    "EulerDiscreteScheduler": {"final_sigmas_type": "zero", "interpolation_type": "linear"},
    "DPMSolverMultistepScheduler": {
        "solver_order": 2,
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
    },
}
# Options we do not implement; each must be falsy or have the listed value.
_UNSUPPORTED = {
    "thresholding": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "interpolation_type": "linear",
    "timestep_type": "discrete",
    "solver_order": 2,
    "solver_type": "midpoint",
    "variance_type": "fixed_small",
}


@dataclass(frozen=True)
class SamplingPlan:
    """Everything a sampler needs besides the denoiser: `sigmas` (n + 1,) float64 decreasing, the scale taking
    unit-variance initial latents to `sigmas[0]`, the scale taking the result back to diffusers' output scale, and
    sampler `options` (keyword arguments) that reproduce the matching diffusers scheduler.

    `quantize_timesteps`: diffusers feeds this schedule's model integer (rounded) timesteps (DPM-Solver with Karras
    sigmas); `denoiser_options()` carries it to the `DiscreteDenoiser` the plan samples with.
    """

    sampler: str
    sigmas: torch.Tensor
    init_noise_scale: float
    final_scale: float
    options: dict[str, Any] = field(default_factory=dict)
    quantize_timesteps: bool = False

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def denoiser_options(self) -> dict[str, Any]:
        """Keyword options of `DiscreteDenoiser` this plan needs to reproduce diffusers exactly."""
        return {"quantize": self.quantize_timesteps}

    def sample(
        self,
        denoiser: Denoiser,
        latents: torch.Tensor,
        cond: dict[str, Any] | None = None,
        *,
        generator: Generators = None,
        callback: Callback | None = None,
        progress: bool = False,
        **options: Any,
    ) -> torch.Tensor:
        """Unit-variance latents (B, C, H, W) -> final latents on diffusers' output scale (B, C, H, W)."""
        sampler = get_sampler(self.sampler)
        x = latents * self.init_noise_scale
        x = sampler(
            denoiser,
            x,
            self.sigmas,
            cond,
            generator=generator,
            callback=callback,
            progress=progress,
            **{**self.options, **options},
        )
        return x * self.final_scale


def default_sampler_for(scheduler_class_name: str, scheduler_config: Mapping[str, Any] | None = None) -> str:
    """Our sampler name for a diffusers scheduler `_class_name` (e.g. PNDMScheduler -> plms)."""
    config = scheduler_config or {}
    if scheduler_class_name == "DPMSolverMultistepScheduler":
        return "dpmpp_2m_sde" if config.get("algorithm_type") == "sde-dpmsolver++" else "dpmpp_2m"
    for sampler, (class_name, _) in SCHEDULER_FOR_SAMPLER.items():
        if class_name == scheduler_class_name:
            return sampler
    known = sorted({class_name for class_name, _ in SCHEDULER_FOR_SAMPLER.values()})
    raise UnknownSamplerError(
        f"scheduler _class_name: unsupported {scheduler_class_name!r}; expected one of {', '.join(known)}"
    )


def scheduler_config_for(sampler: str) -> tuple[str, dict[str, Any]]:
    """(diffusers `_class_name`, extra config keys) that make diffusers run `sampler`."""
    if sampler not in SCHEDULER_FOR_SAMPLER:
        raise UnknownSamplerError(
            f"sampler: unknown name {sampler!r}; valid samplers: {', '.join(sorted(SCHEDULER_FOR_SAMPLER))}"
        )
    class_name, extra = SCHEDULER_FOR_SAMPLER[sampler]
    return class_name, dict(extra)


def resolve_scheduler_config(sampler: str, scheduler_config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as diffusers' scheduler class for `sampler` would see it: class defaults filled in."""
    class_name, extra = scheduler_config_for(sampler)
    resolved = {**_COMMON_DEFAULTS, **_CLASS_DEFAULTS.get(class_name, {})}
    resolved.update({k: v for k, v in scheduler_config.items() if v is not None or k not in resolved})
    resolved.update(extra)
    for key, allowed in _UNSUPPORTED.items():
        value = resolved.get(key)
        if value is not None and value != allowed and not (allowed is False and not value):
            raise ConfigError(f"scheduler.{key}: unsupported value {value!r}; t2i supports {allowed!r}")
    return resolved


def make_plan(
    sampler: str,
    scheduler_config: Mapping[str, Any],
    steps: int,
    use_karras_sigmas: bool = False,
    schedule: DiscreteSchedule | FlowSchedule | None = None,
    *,
    mu: float | None = None,
    times: Any = None,
) -> SamplingPlan:
    """The plan with which `sampler` reproduces diffusers' matching scheduler for `scheduler_config`.

    Args:
        sampler: a registered sampler name (`ddim`, `plms`, `euler`, ...).
        scheduler_config: a diffusers scheduler config dict (`num_train_timesteps`, `beta_schedule`,
            `timestep_spacing`, `steps_offset`, `set_alpha_to_one`, ...); missing keys take that class's defaults.
        steps: number of inference steps.
        use_karras_sigmas: Karras et al. (rho = 7) sigmas between the grid's end points (also on if the config says).
        schedule: the model's training schedule, when the caller holds it (else read from `scheduler_config`).
        mu, times: flow-matching configs only: Flux's resolution-dependent shift (required with
            `use_dynamic_shifting`) and a pipeline's own times (FluxPipeline's `flux_sampling_times`).
    """
    get_sampler(sampler)
    if is_flow_config(scheduler_config):
        flow = schedule if isinstance(schedule, FlowSchedule) else None
        return _flow_plan(sampler, scheduler_config, steps, use_karras_sigmas, flow, mu, times)
    if schedule is None:
        schedule = DiscreteSchedule.from_scheduler_config(scheduler_config)
    if sampler not in SCHEDULER_FOR_SAMPLER:
        return _generic_plan(sampler, scheduler_config, steps, use_karras_sigmas, schedule.sigmas)
    config = resolve_scheduler_config(sampler, scheduler_config)
    karras = bool(use_karras_sigmas or config.get("use_karras_sigmas"))
    sigma_table = schedule.sigmas
    if sampler in ("euler", "euler_ancestral", "heun", "lms"):
        return _ve_plan(sampler, config, steps, karras, sigma_table)
    if sampler in ("dpmpp_2m", "dpmpp_2m_sde"):
        return _dpm_plan(sampler, config, steps, karras, sigma_table)
    return _vp_plan(sampler, config, steps, karras, sigma_table)


def _generic_plan(
    sampler: str, config: Mapping[str, Any], steps: int, karras: bool, table: torch.Tensor
) -> SamplingPlan:
    """Samplers with no diffusers counterpart: the Euler grid of the config, VE in and out."""
    resolved = {**_COMMON_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    plan = _ve_plan("euler", resolved, steps, karras, table)
    return SamplingPlan(sampler, plan.sigmas, plan.init_noise_scale, plan.final_scale)


def _karras_between(grid: torch.Tensor, steps: int, config: Mapping[str, Any]) -> torch.Tensor:
    sigma_min = config.get("sigma_min") or float(grid[-1])
    sigma_max = config.get("sigma_max") or float(grid[0])
    return karras_sigmas(steps, sigma_min, sigma_max)


def _ve_plan(sampler: str, config: dict, steps: int, karras: bool, table: torch.Tensor) -> SamplingPlan:
    """Euler / Euler-ancestral / Heun / LMS: VE sample, sigmas interpolated at (fractional) timesteps."""
    timesteps = spaced_timesteps(
        config["timestep_spacing"], steps, len(table), int(config["steps_offset"]), round_linspace=False
    )
    grid = interpolate_sigmas(timesteps, table)
    if karras:
        grid = _karras_between(grid, steps, config)
    final = float(table[0]) if config.get("final_sigmas_type") == "sigma_min" else 0.0
    sigmas = torch.cat([grid, torch.tensor([final], dtype=torch.float64)])
    sigma_max = float(sigmas.max())
    vp_style_init = config["timestep_spacing"] not in ("linspace", "trailing")
    init = math.sqrt(sigma_max**2 + 1) if vp_style_init else sigma_max
    return SamplingPlan(sampler, sigmas, init, 1.0)


def _vp_plan(sampler: str, config: dict, steps: int, karras: bool, table: torch.Tensor) -> SamplingPlan:
    """DDIM / PLMS / DDPM: VP sample on integer timesteps; DDIM and PNDM step to t - T // steps."""
    num_train = len(table)
    timesteps = spaced_timesteps(config["timestep_spacing"], steps, num_train, int(config["steps_offset"]))
    timesteps = timesteps.astype(np.int64)
    final_alpha_is_one = sampler == "ddpm" or bool(config.get("set_alpha_to_one"))
    sigma_final = 0.0 if final_alpha_is_one else float(table[0])

    def sigma_at(t: int) -> float:
        return float(table[t]) if t >= 0 else sigma_final

    grid = torch.tensor([sigma_at(int(t)) for t in timesteps], dtype=torch.float64)
    options: dict[str, Any] = {}
    if karras:
        grid = _karras_between(grid, steps, {})
    elif sampler != "ddpm":
        options = _off_grid_options(sampler, config, timesteps, num_train, sigma_at)
    sigmas = torch.cat([grid, torch.tensor([sigma_final], dtype=torch.float64)])
    if sampler == "plms" and config.get("prediction_type") == "v_prediction":
        options["multistep_space"] = "v"
    return SamplingPlan(sampler, sigmas, _vp_init(sigmas), _vp_final(sigmas), options)


def _off_grid_options(sampler: str, config: dict, timesteps: np.ndarray, num_train: int, sigma_at) -> dict:
    """`sigmas_to` / `sigma_correct_from` where diffusers' `t -+ T // steps` leaves the timestep grid."""
    ratio = num_train // len(timesteps)
    landing = [int(t) - ratio for t in timesteps]
    options: dict[str, Any] = {}
    if landing[:-1] != [int(t) for t in timesteps[1:]] or landing[-1] >= 0:
        options["sigmas_to"] = torch.tensor([sigma_at(t) for t in landing], dtype=torch.float64)
    if sampler == "plms" and len(timesteps) > 1 and int(timesteps[1]) + ratio != int(timesteps[0]):
        options["sigma_correct_from"] = sigma_at(min(int(timesteps[1]) + ratio, num_train - 1))
    return options


def _dpm_timesteps(config: dict, steps: int, table: torch.Tensor) -> np.ndarray:
    """DPMSolverMultistepScheduler's own grid: `steps + 1` points with the last dropped (linspace, leading)."""
    num_train = len(table)
    lambdas = -table.float().log()  # -log(sigma) = log(alpha) - log(sigma_vp)
    clipped = int(torch.searchsorted(lambdas.flip(0), torch.tensor(float(config["lambda_min_clipped"]))))
    last = num_train - clipped
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last // (steps + 1)
        grid = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
        return grid + int(config["steps_offset"])
    if spacing == "trailing":
        return np.arange(last, 0, -num_train / steps).round().astype(np.int64) - 1
    return spaced_timesteps(spacing, steps, num_train).astype(np.int64)  # raises the ConfigError


def _dpm_plan(sampler: str, config: dict, steps: int, karras: bool, table: torch.Tensor) -> SamplingPlan:
    """DPM-Solver++ multistep: VP sample, its own timestep grid, first-order final step."""
    if karras:
        grid = karras_sigmas(steps, float(table[0]), float(table[-1]))
    else:
        grid = interpolate_sigmas(_dpm_timesteps(config, steps, table), table)
    final = float(table[0]) if config["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = torch.cat([grid, torch.tensor([final], dtype=torch.float64)])
    n = len(grid)
    euler_at_final = bool(config["euler_at_final"]) or (bool(config["lower_order_final"]) and n < 15)
    options = {"euler_at_final": True} if euler_at_final and final > 0 else {}
    quantize = karras and config["beta_schedule"] != "squaredcos_cap_v2"
    return SamplingPlan(sampler, sigmas, _vp_init(sigmas), _vp_final(sigmas), options, quantize)


def _vp_init(sigmas: torch.Tensor) -> float:
    return math.sqrt(1 + float(sigmas[0]) ** 2)


def _vp_final(sigmas: torch.Tensor) -> float:
    return 1 / math.sqrt(1 + float(sigmas[-1]) ** 2)


# ------------------------------------------------------------------------------------------ flow matching

FLOW_SCHEDULERS = {"euler": "FlowMatchEulerDiscreteScheduler", "heun": "FlowMatchHeunDiscreteScheduler"}
# samplers that run a flow grid from t = 1 as diffusers does; `heun` there is Heun's method in flow time
FLOW_NATIVE = {"euler": "euler", "heun": "flow_heun", "flow_heun": "flow_heun"}
_FLOW_UNSUPPORTED = ("invert_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")


def is_flow_config(scheduler_config: Mapping[str, Any]) -> bool:
    """Whether a scheduler config is one of diffusers' flow-matching schedulers (rectified-flow models)."""
    return str(scheduler_config.get("_class_name", "")).startswith("FlowMatch")


def flow_scheduler_config_for(sampler: str) -> str:
    """The diffusers flow-matching scheduler class whose loop `sampler` reproduces (Euler for the others)."""
    return FLOW_SCHEDULERS.get("heun" if FLOW_NATIVE.get(sampler) == "flow_heun" else "euler")


def _flow_plan(
    sampler: str,
    config: Mapping[str, Any],
    steps: int,
    karras: bool,
    schedule: FlowSchedule | None,
    mu: float | None,
    times: Any,
) -> SamplingPlan:
    """Times as diffusers' flow-matching `set_timesteps` lays them out, on the VE scale; the sample starts as
    unit noise z (x = z (1 + sigma_0)) and ends as the clean flow sample (final sigma 0)."""
    for key in _FLOW_UNSUPPORTED:
        if config.get(key):
            raise ConfigError(f"scheduler.{key}: unsupported value {config[key]!r}; t2i supports false")
    schedule = schedule or FlowSchedule.from_scheduler_config(config)
    if str(config.get("_class_name")) == "FlowMatchHeunDiscreteScheduler" and schedule.use_dynamic_shifting:
        raise ConfigError("scheduler.use_dynamic_shifting: FlowMatchHeunDiscreteScheduler has a fixed shift only")
    grid = schedule.sampling_times(steps, mu, times, config.get("shift_terminal"))
    if karras or config.get("use_karras_sigmas"):
        grid[:-1] = karras_sigmas(len(grid) - 1, float(grid[-2]), float(grid[0])).float().double()
    name = FLOW_NATIVE.get(sampler, sampler)
    if name not in FLOW_NATIVE.values():
        grid = grid.clamp(max=1 - 1 / schedule.num_train_timesteps)
    sigmas = flow_t_to_sigma(grid)
    return SamplingPlan(name, sigmas, 1 + float(sigmas[0]), 1.0)
