"""Key layout of sgm (Stability generative-models) single files, i.e. the SDXL base and refiner checkpoints.

  model.diffusion_model.*                        the UNet, in the CompVis names t2i's UNetModel uses as they are
  first_stage_model.*                            the VAE (CompVis names, as in SD 1/2 files)
  conditioner.embedders.{i}.transformer.*        a Hugging Face CLIPTextModel (SDXL base i=0: CLIP ViT-L/14)
  conditioner.embedders.{i}.model.*              an OpenCLIP text tower in open_clip names (SDXL base i=1 and
                                                 refiner i=0: ViT-bigG/14, with `text_projection` (D, E) and the
                                                 fused `attn.in_proj_weight`)
Size embedders (`ConcatTimestepEmbedderND`) hold no weights, so they do not appear. OpenCLIP towers map to HF
CLIPTextModelWithProjection names (`text_model.*` + `text_projection.weight`) through t2i.convert.text_keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from t2i.convert.text_keys import (
    add_prefix,
    hf_clip_under,
    hf_to_openclip,
    openclip_to_hf,
    strip_prefix,
    with_text_model_prefix,
)

SGM_UNET_PREFIX = "model.diffusion_model."
SGM_VAE_PREFIX = "first_stage_model."
SGM_EMBEDDER_PREFIX = "conditioner.embedders."
# Sub-prefix of an embedder's weights by kind: sgm's FrozenCLIPEmbedder keeps the HF model in `transformer`,
# FrozenOpenCLIPEmbedder2 the open_clip model in `model`.
EMBEDDER_SUBMODULE = {"clip": "transformer.", "openclip": "model."}
EmbedderKind = Literal["clip", "openclip"]


@dataclass
class SgmTextEncoder:
    """One text embedder of an sgm conditioner: its index, kind and weights in HF CLIP names."""

    index: int
    kind: EmbedderKind
    state: dict[str, torch.Tensor]


@dataclass
class SgmParts:
    """An sgm checkpoint split by component: UNet in t2i names, VAE in CompVis names, text encoders in HF names
    (ordered by embedder index), and the keys that belong to none of them."""

    unet: dict[str, torch.Tensor] = field(default_factory=dict)
    vae: dict[str, torch.Tensor] = field(default_factory=dict)
    text_encoders: list[SgmTextEncoder] = field(default_factory=list)
    other: list[str] = field(default_factory=list)


def embedder_prefix(index: int, kind: EmbedderKind) -> str:
    """`conditioner.embedders.{index}.transformer.` (clip) or `...model.` (openclip)."""
    return f"{SGM_EMBEDDER_PREFIX}{index}.{EMBEDDER_SUBMODULE[kind]}"


def sgm_unet_to_t2i(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`model.diffusion_model.*` -> t2i UNetModel keys (the names are the same past the prefix)."""
    return strip_prefix(state, SGM_UNET_PREFIX)


def t2i_unet_to_sgm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """t2i UNetModel keys -> `model.diffusion_model.*`."""
    return add_prefix(state, SGM_UNET_PREFIX)


def sgm_clip_to_hf(state: dict[str, torch.Tensor], index: int = 0) -> dict[str, torch.Tensor]:
    """Embedder `index` (a FrozenCLIPEmbedder) -> HF CLIPTextModel keys (`text_model.*`)."""
    return hf_clip_under(state, embedder_prefix(index, "clip"))


def hf_to_sgm_clip(state: dict[str, torch.Tensor], index: int = 0) -> dict[str, torch.Tensor]:
    """HF CLIPTextModel keys -> `conditioner.embedders.{index}.transformer.text_model.*`."""
    return add_prefix(with_text_model_prefix(state), embedder_prefix(index, "clip"))


def sgm_openclip_to_hf(state: dict[str, torch.Tensor], index: int = 1) -> dict[str, torch.Tensor]:
    """Embedder `index` (an OpenCLIP text tower) -> HF CLIPTextModelWithProjection keys; q/k/v are split out
    of `in_proj_*` and `text_projection` (D, E) becomes `text_projection.weight` (E, D)."""
    return openclip_to_hf(state, embedder_prefix(index, "openclip"))


def hf_to_sgm_openclip(state: dict[str, torch.Tensor], index: int = 1) -> dict[str, torch.Tensor]:
    """HF CLIPTextModelWithProjection keys -> `conditioner.embedders.{index}.model.*` in open_clip names."""
    return hf_to_openclip(state, embedder_prefix(index, "openclip"))


def sgm_text_encoders(state: dict[str, torch.Tensor]) -> list[SgmTextEncoder]:
    """Every text embedder found under `conditioner.embedders.*`, in index order, converted to HF names."""
    found: dict[int, EmbedderKind] = {}
    pattern = re.compile(rf"{re.escape(SGM_EMBEDDER_PREFIX)}(\d+)\.(transformer|model)\.")
    for key in state:
        match = pattern.match(key)
        if match:
            found[int(match.group(1))] = "clip" if match.group(2) == "transformer" else "openclip"
    encoders = []
    for index in sorted(found):
        kind = found[index]
        convert = sgm_clip_to_hf if kind == "clip" else sgm_openclip_to_hf
        encoders.append(SgmTextEncoder(index, kind, convert(state, index)))
    return encoders


def split_sgm_checkpoint(state: dict[str, torch.Tensor]) -> SgmParts:
    """Split an sgm (SDXL) single file's tensors into UNet, VAE and text-encoder state dicts.

    Keys of no component (`denoiser.sigmas`, EMA copies, ...) are listed in `other`, not converted.
    """
    parts = SgmParts(
        unet=sgm_unet_to_t2i(state),
        vae=strip_prefix(state, SGM_VAE_PREFIX),
        text_encoders=sgm_text_encoders(state),
    )
    known = (SGM_UNET_PREFIX, SGM_VAE_PREFIX, SGM_EMBEDDER_PREFIX)
    parts.other = [k for k in state if not k.startswith(known)]
    return parts


def join_sgm_checkpoint(parts: SgmParts) -> dict[str, torch.Tensor]:
    """The inverse of split_sgm_checkpoint (without `other`): one dict in sgm single-file names."""
    state = {**t2i_unet_to_sgm(parts.unet), **add_prefix(parts.vae, SGM_VAE_PREFIX)}
    for encoder in parts.text_encoders:
        to_sgm = hf_to_sgm_clip if encoder.kind == "clip" else hf_to_sgm_openclip
        state.update(to_sgm(encoder.state, encoder.index))
    return state
