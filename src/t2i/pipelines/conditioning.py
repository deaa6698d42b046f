"""Per-call conditioning inputs of the latent pipeline beyond the prompt: SDXL's micro-conditioning (sizes, crop
offset, aesthetic score, with diffusers' names and defaults) and the ensemble-of-experts split of a sampling plan
(`denoising_end` on the base, `denoising_start` on the refiner), as diffusers' StableDiffusionXLPipeline and
StableDiffusionXLImg2ImgPipeline do them.

Defaults (diffusers'): original_size = target_size = (height, width) of the image being made, crops (0, 0),
aesthetic score 6.0 and negative aesthetic score 2.5; each `negative_*` value defaults to its positive one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from t2i.diffusion.plans import SamplingPlan
from t2i.diffusion.schedules import DiscreteSchedule
from t2i.errors import InvalidInputError
from t2i.text.conditioner import Conditioner, SizeEmbedder

DEFAULT_AESTHETIC_SCORE = 6.0
DEFAULT_NEGATIVE_AESTHETIC_SCORE = 2.5
# Samplers whose diffusers scheduler keeps its sample on the VP scale (init_noise_sigma 1): latents handed from
# a base stopped early (`denoising_end`) to a refiner are on that scale, as diffusers' `output_type="latent"`.
VP_SAMPLERS = frozenset({"ddpm", "ddim", "plms", "dpmpp_2m", "dpmpp_2m_sde"})


@dataclass
class MicroConditioning:
    """SDXL's micro-conditioning of one call (diffusers' argument names); None takes the default."""

    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    aesthetic_score: float | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    negative_aesthetic_score: float | None = None

    def given(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def values(self, height: int, width: int, negative: bool) -> dict[str, tuple[float, ...]]:
        """{conditioner input key: values} for the positive or the negative (unconditional) branch."""
        size = (height, width)
        positive = {
            "original_size_as_tuple": _pair(self.original_size, "original_size", size),
            "crop_coords_top_left": _pair(self.crops_coords_top_left, "crops_coords_top_left", (0, 0)),
            "target_size_as_tuple": _pair(self.target_size, "target_size", size),
            "aesthetic_score": (_score(self.aesthetic_score, "aesthetic_score", DEFAULT_AESTHETIC_SCORE),),
        }
        if not negative:
            return positive
        return {
            "original_size_as_tuple": _pair(
                self.negative_original_size, "negative_original_size", positive["original_size_as_tuple"]
            ),
            "crop_coords_top_left": _pair(
                self.negative_crops_coords_top_left,
                "negative_crops_coords_top_left",
                positive["crop_coords_top_left"],
            ),
            "target_size_as_tuple": _pair(
                self.negative_target_size, "negative_target_size", positive["target_size_as_tuple"]
            ),
            "aesthetic_score": (
                _score(self.negative_aesthetic_score, "negative_aesthetic_score", DEFAULT_NEGATIVE_AESTHETIC_SCORE),
            ),
        }


# Which MicroConditioning fields feed which conditioner input.
FIELDS_OF_INPUT = {
    "original_size_as_tuple": ("original_size", "negative_original_size"),
    "crop_coords_top_left": ("crops_coords_top_left", "negative_crops_coords_top_left"),
    "target_size_as_tuple": ("target_size", "negative_target_size"),
    "aesthetic_score": ("aesthetic_score", "negative_aesthetic_score"),
}


def _pair(value: Any, name: str, default: tuple) -> tuple[float, float]:
    if value is None:
        return tuple(float(v) for v in default)
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    if not ok or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise InvalidInputError(f"{name}: {value!r}; expected two numbers (height, width) or (top, left)")
    return float(value[0]), float(value[1])


def _score(value: Any, name: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInputError(f"{name}: {value!r}; expected a finite number")
    return float(value)


def size_inputs(
    conditioner: Conditioner,
    micro: MicroConditioning,
    height: int,
    width: int,
    count: int,
    negative: bool = False,
) -> dict[str, torch.Tensor]:
    """The size inputs (count, N) float32 that `conditioner`'s size embedders read; InvalidInputError for a
    micro-conditioning value no embedder of this model reads (e.g. `aesthetic_score` on the SDXL base)."""
    keys = [e.input_key for e in conditioner.embedders if isinstance(e, SizeEmbedder)]
    used = {name for key in keys for name in FIELDS_OF_INPUT.get(key, ())}
    unused = [name for name in micro.given() if name not in used]
    if unused:
        reads = ", ".join(sorted(used)) or "none"
        raise InvalidInputError(
            f"{unused[0]}: this model is not conditioned on it; its micro-conditioning inputs are: {reads}"
        )
    values = micro.values(height, width, negative)
    return {key: torch.tensor([values[key]] * count, dtype=torch.float32) for key in keys}


# ------------------------------------------------------------------------------------------ ensemble of experts


def _split_index(plan: SamplingPlan, schedule: DiscreteSchedule, fraction: Any, name: str) -> int:
    """How many of the plan's steps have a timestep >= the cutoff `round(T - fraction * T)` (diffusers'
    `discrete_timestep_cutoff`): the base's steps before it hands over; the refiner takes the rest."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise InvalidInputError(f"{name}: {fraction!r}; expected a number in (0, 1)")
    total = schedule.num_train_timesteps
    cutoff = round(total - fraction * total)
    if cutoff >= total:
        return 0
    threshold = float(schedule.sigmas[cutoff])  # sigma grows with the timestep: t >= cutoff <=> sigma >= this
    return int((plan.sigmas[:-1].double() >= threshold).sum())


def head_plan(plan: SamplingPlan, schedule: DiscreteSchedule, denoising_end: Any) -> SamplingPlan:
    """The base's part of the plan: the steps before `denoising_end`; its result stays noisy (at the next sigma),
    on the scale diffusers' scheduler keeps its sample (VP for DDIM/PNDM/DPM-Solver, VE for Euler-type)."""
    steps = _split_index(plan, schedule, denoising_end, "denoising_end")
    if steps < 1:
        raise InvalidInputError(f"denoising_end: {denoising_end} leaves no step of {plan.steps}; expected more")
    if steps == plan.steps:
        return plan
    options = dict(plan.options)
    if "sigmas_to" in options:
        options["sigmas_to"] = options["sigmas_to"][:steps]
    options.pop("euler_at_final", None)  # the full plan's final step is the refiner's
    sigmas = plan.sigmas[: steps + 1]
    final = 1 / math.sqrt(1 + float(sigmas[-1]) ** 2) if plan.sampler in VP_SAMPLERS else 1.0
    return SamplingPlan(plan.sampler, sigmas, plan.init_noise_scale, final, options, plan.quantize_timesteps)


def refiner_start(plan: SamplingPlan, schedule: DiscreteSchedule, denoising_start: Any) -> int:
    """The step the refiner starts at for `denoising_start`: the first one with a timestep below the cutoff."""
    start = _split_index(plan, schedule, denoising_start, "denoising_start")
    if start >= plan.steps:
        raise InvalidInputError(f"denoising_start: {denoising_start} leaves no step of {plan.steps}; expected less")
    return start


def latents_to_sampler_scale(latents: torch.Tensor, plan: SamplingPlan) -> torch.Tensor:
    """Latents handed over by a base stopped at `plan.sigmas[0]` (diffusers' scale for this sampler) -> the VE
    scale our samplers start from."""
    if plan.sampler in VP_SAMPLERS:
        return latents * math.sqrt(1 + float(plan.sigmas[0]) ** 2)
    return latents


def tail_plan(plan: SamplingPlan, start: int) -> SamplingPlan:
    """The plan from step `start` on (img2img): sigmas and per-step options sliced, the input taken as is."""
    options = dict(plan.options)
    if "sigmas_to" in options:
        options["sigmas_to"] = options["sigmas_to"][start:]
    if start > 0:
        options.pop("sigma_correct_from", None)  # corrects PLMS's warm-up from the full grid's first step
    return SamplingPlan(
        plan.sampler, plan.sigmas[start:], 1.0, plan.final_scale, options, plan.quantize_timesteps
    )


def strength_tail(plan: SamplingPlan, steps: int, strength: float) -> SamplingPlan:
    """The last `int(steps * strength)` steps of `plan` (diffusers' img2img `get_timesteps`); InvalidInputError
    when that leaves no step."""
    denoise_steps = min(int(steps * strength), steps)
    if denoise_steps < 1:
        raise InvalidInputError(f"strength: {strength} x steps {steps} leaves no step; expected strength*steps >= 1")
    return tail_plan(plan, steps - denoise_steps)
