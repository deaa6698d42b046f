"""Builders: a `model:` config section -> the nn.Modules of a pipeline (UNet, VAE, text encoder).

`model_cfg` may be a plain dict, an OmegaConf DictConfig, a config dataclass (`LatentDiffusionConfig`, or a whole
`RunConfig`, whose `.model` is used) or a bundled config name such as `sd15`. Missing keys take the schema
defaults and every key is validated by `t2i.config`.

`device="meta"` builds the modules without allocating memory (parameter counts, `t2i info`). On the meta device
the text encoder is the bare Hugging Face model built from its config (no weights are read); otherwise it is a
frozen `t2i.text.encoders.TextEncoder` read from local files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.errors import ConfigError

# Hugging Face CLIP tokenizer vocabulary and context used by every SD text encoder (CLIP and OpenCLIP).
CLIP_VOCAB_SIZE = 49408
CLIP_CONTEXT_LENGTH = 77
CLIP_L_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
}
# T5 encoders by `arch` (FLUX.1's and Imagen's T5 v1.1 XXL), for building on meta without a local config.
T5_ARCHS = {
    "t5-v1_1-xxl": {
        "vocab_size": 32128,
        "d_model": 4096,
        "d_kv": 64,
        "d_ff": 10240,
        "num_layers": 24,
        "num_heads": 64,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
    },
}


def as_model_config(model_cfg: Any) -> Any:
    """Any accepted form of a `model:` section -> the validated config dataclass (defaults filled in)."""
    from t2i.config import build_config, load_config

    if isinstance(model_cfg, (str, Path)):
        return load_config(model_cfg).model
    if dataclasses.is_dataclass(model_cfg) and not isinstance(model_cfg, type):
        if hasattr(model_cfg, "model") and hasattr(model_cfg, "trainer"):
            return model_cfg.model
        model_cfg = dataclasses.asdict(model_cfg)
    elif not isinstance(model_cfg, dict):
        from omegaconf import DictConfig, OmegaConf

        if not isinstance(model_cfg, DictConfig):
            raise ConfigError(
                f"model config: expected a dict, DictConfig or dataclass, got {type(model_cfg).__name__}"
            )
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    if "model" in model_cfg and "kind" not in model_cfg:
        model_cfg = model_cfg["model"]
    return build_config({"model": model_cfg}).model


def _device_context(device: str | torch.device | None) -> Any:
    return torch.device(device) if device is not None else nullcontext()


def _require_latent(cfg: Any, what: str) -> None:
    if cfg.kind != "latent_diffusion":
        raise ConfigError(f"model.kind: {cfg.kind!r} has no {what}; expected latent_diffusion")


def build_unet(model_cfg: Any, device: str | torch.device | None = None) -> nn.Module:
    """The denoising network: `UNetModel` for `latent_diffusion`, the Imagen UNet for `imagen` (random init)."""
    cfg = as_model_config(model_cfg)
    with _device_context(device):
        if cfg.kind == "imagen":
            from t2i.models.imagen_unet import build_imagen_unet
            from t2i.pipelines.imagen_stage import unet_kwargs

            return build_imagen_unet(cfg.unet_type, unet_kwargs(cfg))
        _require_latent(cfg, "unet")
        from t2i.models.unet import UNetModel

        return UNetModel(**cfg.unet_config.model_kwargs())


def build_vae(model_cfg: Any, device: str | torch.device | None = None) -> nn.Module:
    """The SD `AutoencoderKL` from `first_stage_config` (random init; loaders fill the weights)."""
    from t2i.models.autoencoder import AutoencoderKL

    cfg = as_model_config(model_cfg)
    _require_latent(cfg, "vae")
    first = cfg.first_stage_config
    with _device_context(device):
        return AutoencoderKL(
            first.embed_dim, dataclasses.asdict(first.ddconfig), scale_factor=cfg.scale_factor
        )


def build_text_encoder(
    model_cfg: Any, device: str | torch.device | None = None, path: str | Path | None = None
) -> nn.Module:
    """The text encoder named by `cond_stage_config` (`path` overrides `cond_stage_config.path`).

    On `device="meta"` returns the bare Hugging Face model built from its config; otherwise the frozen
    `TextEncoder` loaded from local files and moved to `device`.
    """
    cfg = as_model_config(model_cfg)
    _require_latent(cfg, "text encoder")
    cond = cfg.cond_stage_config
    return text_encoder_of(cond, device, path if path is not None else cond.path)


def text_encoder_of(cond: Any, device: str | torch.device | None = None, folder: str | Path | None = None) -> nn.Module:
    """The text encoder of one `CondStageConfig` (a text embedder's `emb_model`) read from `folder`; on the meta
    device the bare Hugging Face model."""
    if device is not None and torch.device(device).type == "meta":
        return text_model_on_meta(cond, folder)
    from t2i.text.encoders import build_text_encoder as build_from_files

    encoder = build_from_files(
        cond.kind, folder, layer=cond.layer, max_length=cond.max_length, arch=cond.arch, version=cond.version
    )
    return encoder.to(device) if device is not None else encoder


def build_text_encoders(model_cfg: Any, device: str | torch.device | None = None) -> dict[str, nn.Module]:
    """{diffusers component name: text encoder} of the conditioner's text embedders (SD 1/2: `text_encoder`
    from `cond_stage_config`; SDXL: `text_encoder` and `text_encoder_2`, the refiner only the latter), each read
    from its `emb_model.path` (`build_text_encoder` for one)."""
    from t2i.text.conditioner import text_encoder_names

    cfg = as_model_config(model_cfg)
    _require_latent(cfg, "text encoder")
    if cfg.conditioner_config is None:
        return {"text_encoder": build_text_encoder(cfg, device)}
    texts = [e.emb_model for e in cfg.embedders() if e.is_text]
    names = text_encoder_names([t.always_return_pooled for t in texts])
    return {name: text_encoder_of(t, device, t.path) for name, t in zip(names, texts, strict=True)}


def text_model_on_meta(cond: Any, folder: str | Path | None) -> nn.Module:
    """The Hugging Face text model of `cond_stage_config` on the meta device, from a config only. A pooled CLIP
    embedder (`always_return_pooled`, SDXL's bigG) is a CLIPTextModelWithProjection, as diffusers holds it."""
    import transformers

    config = _text_config(cond, folder)
    with torch.device("meta"):
        if cond.kind in ("clip", "openclip") and cond.always_return_pooled:
            return transformers.CLIPTextModelWithProjection(config)
        model = getattr(transformers, _text_model_class(cond.kind, config))(config)
        if cond.kind == "openclip":
            return OpenCLIPTextTower(model, nn.Linear(config.hidden_size, config.projection_dim, bias=False))
        return model


class OpenCLIPTextTower(nn.Module):
    """OpenCLIP text tower as t2i holds it: a CLIPTextModel plus the (bias-free) text projection."""

    def __init__(self, model: nn.Module, text_projection: nn.Linear):
        super().__init__()
        self.model = model
        self.text_projection = text_projection


def _text_model_class(kind: str, config: Any) -> str:
    if kind in ("clip", "openclip"):
        return "CLIPTextModel"
    if kind == "t5":
        return "T5EncoderModel"
    architectures = getattr(config, "architectures", None) or ["BertModel"]
    return architectures[0].removesuffix("ForMaskedLM")


def _text_config(cond: Any, folder: str | Path | None) -> Any:
    """The HF config of the text encoder: read from `folder` (or its text_encoder/), else the kind's default."""
    from transformers import AutoConfig, CLIPTextConfig

    config_file = _find_text_config(folder) if folder is not None else None
    if config_file is None and cond.kind == "minilm":
        from t2i.text.encoders import minilm_path

        config_file = minilm_path() / "config.json"
    if config_file is not None:
        return AutoConfig.from_pretrained(str(config_file.parent), local_files_only=True)
    if cond.kind == "clip":
        return CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_CONTEXT_LENGTH, **CLIP_L_TEXT
        )
    if cond.kind == "openclip":
        return _openclip_default_config(cond.arch)
    if cond.kind == "t5" and cond.arch in T5_ARCHS:
        from transformers import T5Config

        return T5Config(**T5_ARCHS[cond.arch])
    raise ConfigError(
        f"model.cond_stage_config.path: missing; a {cond.kind} encoder needs a local folder with "
        "config.json to be built"
    )


def _find_text_config(folder: str | Path) -> Path | None:
    folder = Path(folder)
    for candidate in (folder / "text_encoder" / "config.json", folder / "config.json"):
        if candidate.is_file():
            return candidate
    return None


def _openclip_default_config(arch: str | None) -> Any:
    from transformers import CLIPTextConfig

    from t2i.text.encoders import OPENCLIP_ARCHS

    base = (arch or "").removesuffix("-quickgelu")
    if base not in OPENCLIP_ARCHS:
        raise ConfigError(
            f"model.cond_stage_config.arch: {arch!r} unknown; expected one of {list(OPENCLIP_ARCHS)}"
        )
    spec = OPENCLIP_ARCHS[base]
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_CONTEXT_LENGTH,
        hidden_size=spec["width"],
        intermediate_size=4 * spec["width"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        projection_dim=spec["width"],
    )


def build_components(model_cfg: Any, device: str | torch.device | None = None) -> dict[str, nn.Module]:
    """{"unet", "vae", "text_encoder"[, "text_encoder_2"]} for `latent_diffusion` (SDXL's refiner: "text_encoder_2"
    alone); {"unet"} for `imagen` (text encoders are separate). (`flow` models:
    `t2i.pipelines.flux_folder.build_flow_components`.)"""
    cfg = as_model_config(model_cfg)
    if cfg.kind == "imagen":
        return {"unet": build_unet(cfg, device)}
    if cfg.kind == "autoencoder":
        from t2i.models.autoencoder import AutoencoderKL

        with _device_context(device):
            return {"vae": AutoencoderKL(cfg.embed_dim, dataclasses.asdict(cfg.ddconfig))}
    return {"unet": build_unet(cfg, device), "vae": build_vae(cfg, device), **build_text_encoders(cfg, device)}


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements, shared parameters counted once (works on the meta device)."""
    return sum(math.prod(p.shape) for p in module.parameters())


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; ConfigError naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path}: cannot read JSON ({exc.__class__.__name__}); expected a JSON object"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
