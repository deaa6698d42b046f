"""Checks and conversions of the inputs and outputs that every pipeline shares: prompts, negative prompts,
guidance scales, and pixels to PIL images."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from t2i.errors import InvalidInputError


def normalize_prompts(prompt: str | list[str], name: str = "prompt") -> list[str]:
    """A prompt or a non-empty list of prompts -> list of strings; InvalidInputError otherwise."""
    prompts = (
        [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    )
    if prompts is None or not all(isinstance(p, str) for p in prompts):
        raise InvalidInputError(f"{name}: expected a string or a list of strings, got {prompt!r}")
    if not prompts:
        raise InvalidInputError(f"{name}: empty list; expected at least one prompt")
    return prompts


def negative_prompts(negative_prompt: str | list[str] | None, count: int) -> list[str]:
    """The unconditional prompts: "" (diffusers' default), one string for all, or one per prompt."""
    if negative_prompt is None:
        return [""] * count
    negatives = normalize_prompts(negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        return negatives * count
    if len(negatives) != count:
        raise InvalidInputError(
            f"negative_prompt: {len(negatives)} prompts for {count} prompts; expected 1 or {count}"
        )
    return negatives


def check_guidance_scale(guidance_scale: Any) -> float:
    """A finite guidance scale as a float; InvalidInputError for strings, booleans, NaN and inf."""
    ok = isinstance(guidance_scale, (int, float)) and not isinstance(guidance_scale, bool)
    if not ok or not math.isfinite(guidance_scale):
        raise InvalidInputError(f"guidance_scale: {guidance_scale!r}; expected a finite number (1 = no guidance)")
    return float(guidance_scale)


def to_pil(pixels: torch.Tensor) -> list[Any]:
    """(B, 3, H, W) in [0, 1] -> PIL RGB images, rounded like diffusers' `numpy_to_pil`."""
    from PIL import Image

    array = (pixels.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def check_rescale(guidance_rescale: Any) -> float:
    """diffusers' `guidance_rescale` as a float in [0, 1]; InvalidInputError otherwise."""
    ok = isinstance(guidance_rescale, (int, float)) and not isinstance(guidance_rescale, bool)
    if not ok or not 0 <= guidance_rescale <= 1:
        raise InvalidInputError(f"guidance_rescale: {guidance_rescale!r}; expected a number in [0, 1] (0 = off)")
    return float(guidance_rescale)


def check_num_images(num_images: Any) -> int:
    """Images per prompt: an integer >= 1 (not a boolean); InvalidInputError otherwise."""
    if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
        raise InvalidInputError(f"num_images: expected an integer >= 1, got {num_images!r}")
    return num_images


def check_strength(strength: Any) -> float:
    """img2img / inpainting strength: a number in (0, 1] (not a boolean); InvalidInputError otherwise."""
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0 < strength <= 1:
        raise InvalidInputError(f"strength: {strength!r}; expected a number in (0, 1]")
    return float(strength)

