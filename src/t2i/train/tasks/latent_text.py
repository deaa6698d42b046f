"""The latent task's text side: one frozen text encoder per text embedder of `model.embedders()` (SD 1/2: the one
of `cond_stage_config`; SDXL: CLIP ViT-L and OpenCLIP bigG), named as diffusers names them (`text_encoder`,
`text_encoder_2`), the conditioner over them (each embedder with its own dropout rate: `text_drop_rate` for SD 1/2,
each `conditioner_config.emb_models[i].ucg_rate` for SDXL), and the encoding of "" that precached runs read from
`uncond.safetensors` (written by `t2i precache` with the names of `t2i.text.conditioner.precached_keys`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.text.conditioner import Conditioner, build_conditioner, precached_keys, text_encoder_names

UNCOND_FILE = "uncond.safetensors"


def text_encoder_names_of(m: Any) -> list[str]:
    """The diffusers names of the text encoders a `latent_diffusion` config conditions on, in embedder order."""
    return text_encoder_names([e.emb_model.always_return_pooled for e in m.embedders() if e.is_text])


def text_encoder_configs(m: Any) -> dict[str, Any]:
    """{name: CondStageConfig} of every text embedder of `m`."""
    texts = [e.emb_model for e in m.embedders() if e.is_text]
    return dict(zip(text_encoder_names_of(m), texts, strict=True))


def build_embedder_encoder(emb: Any) -> nn.Module:
    """The frozen `TextEncoder` of one text embedder's `emb_model` (a `CondStageConfig`), from local files."""
    from t2i.text.encoders import build_text_encoder

    return build_text_encoder(emb.kind, emb.path, layer=emb.layer, max_length=emb.max_length, arch=emb.arch,
                              version=emb.version)  # fmt: skip


def find_stored_uncond(train: list[str]) -> Path | None:
    """`uncond.safetensors` in the folder of the first precached source (a folder or a shard pattern), if any."""
    if not train:
        return None
    source = Path(str(train[0]))
    folder = source if source.is_dir() else source.parent
    path = folder / UNCOND_FILE
    return path if path.is_file() else None


def read_stored_uncond(path: Path, index: int = 0) -> dict[str, torch.Tensor]:
    """Text embedder `index`'s encoding of "" as `t2i precache` stored it: `embeddings` (1, T, D) [and `pooled`
    (1, P)]."""
    from safetensors.torch import load_file

    stored, keys = load_file(str(path)), precached_keys(index)
    out = {"embeddings": stored[keys["embeddings"]].float().unsqueeze(0)}
    if keys["pooled"] in stored:
        out["pooled"] = stored[keys["pooled"]].float().unsqueeze(0)
    if keys["mask"] in stored:
        out["mask"] = stored[keys["mask"]].bool().unsqueeze(0)
    return out


def task_conditioner(
    m: Any, encoder: Callable[[str], nn.Module], unet: nn.Module, stored: Path | None
) -> Conditioner:
    """The conditioner of `m.embedders()`, its text embedders reading `encoder(name)` on first use and, with a
    stored `uncond.safetensors`, their encoding of "" from it; widths checked against the `unet` actually
    trained (a base pipeline's may differ from `m.unet_config`)."""
    names = text_encoder_names_of(m)
    empty = [
        None if stored is None else (lambda i=i: read_stored_uncond(stored, i)) for i in range(len(names))
    ]
    conditioner = build_conditioner(m, [lambda name=name: encoder(name) for name in names], empty)
    config = getattr(unet, "unet_config", None)
    if config is not None:
        conditioner.context_dim = config["context_dim"]
        conditioner.adm_in_channels = config["adm_in_channels"] if config["num_classes"] is not None else None
    return conditioner
