"""`save_single_file`: a pipeline as one original-layout `.safetensors` checkpoint, the inverse of
`t2i.pipelines.single_file` / `sgm_file`, which diffusers' `from_single_file` and the CompVis/sgm code read.

  model.diffusion_model.*                      the UNet (t2i's own CompVis names)
  first_stage_model.*                          the VAE (CompVis names)
  SD 1/2:  cond_stage_model.transformer.*      a Hugging Face CLIP text model (SD 1's layout)
           cond_stage_model.model.*            an OpenCLIP tower (SD 2's, for a text encoder t2i holds as one)
  SDXL:    conditioner.embedders.{i}.transformer.*   text embedder i without projection (CLIP ViT-L)
           conditioner.embedders.{i}.model.*         text embedder i with projection (bigG, open_clip names)

`i` is the embedder's position in the conditioner, which with sgm's order (text embedders first) is the index
sgm uses: CLIP-L 0 and bigG 1 in the base, bigG 0 in the refiner. The layer an encoder conditions on is not part
of the file; the config that loads it says it. An SD 2 pipeline read from a diffusers folder holds its text
encoder as a (truncated) Hugging Face model, so it is written in SD 1's layout: load that file with
`model.cond_stage_config.kind=clip` and `layer=last`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.convert.sgm_keys import hf_to_sgm_clip, hf_to_sgm_openclip
from t2i.convert.text_keys import add_prefix, hf_to_sd1_text, hf_to_sd2_text
from t2i.errors import InvalidInputError
from t2i.pipelines.single_file import UNET_PREFIX, VAE_PREFIX


def hf_text_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP TextEncoder's weights in HF CLIPTextModel(WithProjection) names (`text_projection.weight` when it
    has a projection)."""
    state = {k: v for k, v in encoder.model.state_dict().items() if not k.endswith("position_ids")}
    projection = getattr(encoder, "text_projection", None)
    if projection is not None:
        state["text_projection.weight"] = projection.weight
    return state


def _check_clip(encoder: nn.Module, name: str) -> None:
    if getattr(encoder, "kind", None) not in ("clip", "openclip"):
        raise InvalidInputError(
            f"{name}: a {getattr(encoder, 'kind', type(encoder).__name__)} text encoder has no single-file layout; "
            "expected CLIP or OpenCLIP (SD 1/2, SDXL)"
        )


def text_state(pipe: Any) -> dict[str, torch.Tensor]:
    """The text encoders' tensors in the single-file layout of `pipe`'s family (see the module docstring)."""
    from t2i.text.conditioner import TextEmbedder

    conditioner = pipe.conditioner
    if len(conditioner.embedders) == 1:  # SD 1/2: one text encoder under cond_stage_model
        encoder = pipe.text_encoder
        _check_clip(encoder, "text_encoder")
        to_file = hf_to_sd2_text if encoder.kind == "openclip" else hf_to_sd1_text
        return to_file(hf_text_state(encoder))
    state: dict[str, torch.Tensor] = {}
    texts = iter(pipe.text_encoders.items())
    for index, embedder in enumerate(conditioner.embedders):
        if not isinstance(embedder, TextEmbedder):
            continue
        name, encoder = next(texts)
        _check_clip(encoder, name)
        to_file = hf_to_sgm_openclip if encoder.text_projection is not None else hf_to_sgm_clip
        state.update(to_file(hf_text_state(encoder), index))
    return state


def single_file_state(pipe: Any, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of `pipe` under its single-file name, contiguous on the CPU (floats cast to `dtype`)."""
    state = {
        **add_prefix(pipe.unet.state_dict(), UNET_PREFIX),
        **add_prefix(pipe.vae.state_dict(), VAE_PREFIX),
        **text_state(pipe),
    }

    def prepared(value: torch.Tensor) -> torch.Tensor:
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        return value.contiguous()

    return {k: prepared(v) for k, v in state.items()}


def save_single_file(pipe: Any, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `pipe` (SD 1/2 or SDXL) as one `.safetensors` file in the original key layout, streamed and atomic
    (`t2i.atomic`: a full disk is a DiskFullError and leaves no partial file). Returns the path."""
    from t2i.atomic import atomic_write, tensor_bytes, write_safetensors

    path = Path(path)
    if path.suffix != ".safetensors":
        raise InvalidInputError(f"{path}: expected a .safetensors path for the single file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = single_file_state(pipe, dtype)
    return atomic_write(path, lambda f: write_safetensors(f, tensors, {"format": "pt"}), tensor_bytes(tensors))
