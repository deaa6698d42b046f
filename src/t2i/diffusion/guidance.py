"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022, eq. 6 written in x0-space)."""

from __future__ import annotations

from typing import Any

import torch

from t2i.diffusion.denoisers import DenoiserWrapper
from t2i.diffusion.parameterization import output_from_x0, x0_from_output
from t2i.diffusion.tensors import append_dims
from t2i.errors import InvalidInputError

UNCOND_PREFIX = "uncond_"


class CFGDenoiser(DenoiserWrapper):
    """D_cfg(x, sigma) = D(x, sigma, uncond) + scale * (D(x, sigma, cond) - D(x, sigma, uncond)).

    Every cond entry `K` with an `uncond_K` twin is conditioning that differs between the branches: `context`
    (B, T, D) with `uncond_context` (the caller passes whatever text dropout put in at training: the SD family the
    encoding of "", Imagen zeros), SDXL's pooled vector `y` with `uncond_y`, ... `context` without a twin gets
    zeros; a `context_mask` missing on one side means "attend to every token". Both branches run in one batch of
    2B; every other tensor entry with a leading batch dimension (`x_low_res`, `aug_cond`, ...) is repeated.
    With scale == 1 the unconditional branch is skipped.

    `rescale` (diffusers' `guidance_rescale`, Lin et al. 2023 "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", eq. 15-16) pulls the guided prediction's per-image standard deviation back towards the
    conditional one's, blended by `rescale` in [0, 1]. The statistics are taken in the network's own output space
    (eps or v), as the paper and diffusers do, so the inner denoiser must say its `prediction`.
    """

    def __init__(self, inner: Any, scale: float, rescale: float = 0.0) -> None:
        super().__init__(inner)
        self.scale = float(scale)
        self.rescale = float(rescale)

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any] | None = None
    ) -> torch.Tensor:
        """x (B, ...), sigma (B,) -> guided x0_hat (B, ...)."""
        cond = dict(cond or {})
        if self.scale == 1.0:
            return self.inner(x, sigma, _without_uncond(cond))
        batch = x.shape[0]
        doubled = _doubled_cond(cond, batch)
        out = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), doubled)
        uncond_out, cond_out = out.chunk(2)
        guided = uncond_out + self.scale * (cond_out - uncond_out)
        return self.rescaled(guided, cond_out, x, sigma) if self.rescale else guided

    def rescaled(
        self, guided: torch.Tensor, cond_out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        prediction = getattr(self.inner, "prediction", None)
        if prediction is None:
            raise InvalidInputError("guidance_rescale: needs a denoiser with a prediction type (eps, v or x0)")
        s = append_dims(sigma.to(x.dtype), x.ndim)
        guided_out = output_from_x0(guided, x, s, prediction)
        text_out = output_from_x0(cond_out, x, s, prediction)
        dims = list(range(1, x.ndim))
        matched = guided_out * (text_out.std(dim=dims, keepdim=True) / guided_out.std(dim=dims, keepdim=True))
        blended = self.rescale * matched + (1 - self.rescale) * guided_out
        return x0_from_output(blended, x, s, prediction)


def _without_uncond(cond: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cond.items() if not k.startswith(UNCOND_PREFIX)}


def _paired_keys(cond: dict[str, Any]) -> list[str]:
    """The entries that differ between the branches: those with an `uncond_` twin, plus context and its mask."""
    keys = [k for k in cond if not k.startswith(UNCOND_PREFIX) and UNCOND_PREFIX + k in cond]
    keys += [k for k in ("context", "context_mask") if k not in keys and (k in cond or UNCOND_PREFIX + k in cond)]
    return keys


def _pair(cond_value: torch.Tensor | None, uncond_value: torch.Tensor | None, key: str) -> torch.Tensor | None:
    """cat([uncond, cond]) along the batch; a missing mask on one side means 'attend to every token', a missing
    unconditional context means zeros."""
    if cond_value is None and uncond_value is None:
        return None
    if key == "context_mask":
        reference = cond_value if cond_value is not None else uncond_value
        cond_value = torch.ones_like(reference) if cond_value is None else cond_value
        uncond_value = torch.ones_like(reference) if uncond_value is None else uncond_value
    elif uncond_value is None:
        uncond_value = torch.zeros_like(cond_value)
    if cond_value is None or uncond_value.shape != cond_value.shape:
        shape = None if cond_value is None else tuple(cond_value.shape)
        raise InvalidInputError(
            f"cond.{UNCOND_PREFIX}{key}: shape {tuple(uncond_value.shape)} must match cond.{key} shape {shape}"
        )
    return torch.cat([uncond_value, cond_value])


def _doubled_cond(cond: dict[str, Any], batch: int) -> dict[str, Any]:
    """The 2B-batch cond: (uncond, cond) pairs for the paired entries, other batch tensors repeated."""
    paired = _paired_keys(cond)
    doubled: dict[str, Any] = {}
    for key in paired:
        value = _pair(cond.get(key), cond.get(UNCOND_PREFIX + key), key)
        if value is not None:
            doubled[key] = value
    for key, value in _without_uncond(cond).items():
        if key in paired:
            continue
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
            value = torch.cat([value, value])
        doubled[key] = value
    return doubled


class ImageTextCFGDenoiser(DenoiserWrapper):
    """InstructPix2Pix's two-scale guidance (Brooks et al. 2023, eq. 3), in x0-space:

        D = D(uncond text, no image) + s_T (D(text, image) - D(uncond text, image))
              + s_I (D(uncond text, image) - D(uncond text, no image))

    `cond[image_key]` holds the source image's conditioning channels; "no image" is zeros there. The text entries
    pair with their `uncond_` twins as in `CFGDenoiser`. All three branches run in one batch of 3B, in
    diffusers' order (text+image, image, neither)."""

    def __init__(self, inner: Any, text_scale: float, image_scale: float, image_key: str = "concat") -> None:
        super().__init__(inner)
        self.text_scale = float(text_scale)
        self.image_scale = float(image_scale)
        self.image_key = image_key

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any] | None = None
    ) -> torch.Tensor:
        cond = dict(cond or {})
        batch = x.shape[0]
        image = cond.pop(self.image_key)
        doubled = _doubled_cond(cond, batch)  # rows: uncond text, then text
        text_first = {
            k: torch.cat([v[batch:], v[:batch], v[:batch]]) if _is_batch(v, 2 * batch) else v
            for k, v in doubled.items()
        }
        text_first[self.image_key] = torch.cat([image, image, torch.zeros_like(image)])
        out = self.inner(torch.cat([x, x, x]), torch.cat([sigma, sigma, sigma]), text_first)
        with_text, image_only, neither = out.chunk(3)
        return (
            neither
            + self.text_scale * (with_text - image_only)
            + self.image_scale * (image_only - neither)
        )


def _is_batch(value: Any, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows
