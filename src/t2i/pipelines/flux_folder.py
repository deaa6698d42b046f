"""Flux pipelines on disk and from configs: the diffusers `FluxPipeline` folder (`model_index.json` + `transformer/
vae/ text_encoder/ tokenizer/ text_encoder_2/ tokenizer_2/ scheduler/`, plus t2i's `t2i.yaml`), a BFL single file
with a `kind: flow` config naming the other parts, and the modules of a `model:` section (random init, or on the
meta device for parameter counts).

Names: diffusers' `text_encoder` (CLIP) is the config's `pooled_encoder`, `text_encoder_2` (T5) its
`context_encoder`. A model whose pooled vector comes from its context encoder (MiniLM) saves no `text_encoder/`;
diffusers cannot load such a folder (its FluxPipeline needs CLIP and T5), t2i can.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.errors import ConfigError, PipelineLoadError
from t2i.pipelines.build import _device_context, as_model_config, read_json
from t2i.pipelines.flux import FluxPipeline
from t2i.pipelines.flux_save import (
    DIFFUSERS_VERSION,
    MODEL_INDEX,
    SCHEDULER_CONFIG,
    T2I_CONFIG,
    derived_model_config,
)

FLUX_COMPONENTS = ("transformer", "vae", "text_encoder_2", "tokenizer_2", "scheduler")
TEXT_KIND_OF_CLASS = {"CLIPTextModel": "clip", "T5EncoderModel": "t5", "BertModel": "minilm"}


def is_flux_folder(root: Path) -> bool:
    """Whether `root` is a diffusers/t2i Flux pipeline folder (its model_index names a Flux pipeline)."""
    index = root / MODEL_INDEX
    if not index.is_file():
        return False
    try:
        return str(read_json(index).get("_class_name", "")).startswith("Flux")
    except ConfigError:
        return False


# ---------------------------------------------------------------------------------------- from a config


def scheduler_config_from_model(model_cfg: Any) -> dict[str, Any]:
    """The diffusers FlowMatchEulerDiscreteScheduler config of a `kind: flow` config's schedule."""
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        **dataclasses.asdict(model_cfg.schedule),
    }


def build_transformer(model_cfg: Any, device: str | torch.device | None = None) -> nn.Module:
    """The backbone named by `transformer_config.kind` (random init)."""
    cfg = as_model_config(model_cfg).transformer_config
    if cfg.kind != "flux":
        raise ConfigError(f"model.transformer_config.kind: {cfg.kind!r} has no builder; expected flux")
    from t2i.models.flux import FluxTransformer

    with _device_context(device):
        return FluxTransformer(**cfg.model_kwargs())


def build_flow_vae(model_cfg: Any, device: str | torch.device | None = None) -> nn.Module:
    """The AutoencoderKL of `first_stage_config` (random init; loaders fill the weights)."""
    from t2i.models.autoencoder import AutoencoderKL

    cfg = as_model_config(model_cfg)
    first = cfg.first_stage_config
    with _device_context(device):
        return AutoencoderKL(
            first.embed_dim,
            dataclasses.asdict(first.ddconfig),
            use_quant_conv=first.use_quant_conv,
            use_post_quant_conv=first.use_post_quant_conv,
            scale_factor=cfg.scale_factor,
            shift_factor=cfg.shift_factor,
        )


def build_text(cond: Any, device: str | torch.device | None = None) -> nn.Module:
    """A frozen TextEncoder from local files, or on `device="meta"` the bare HF model built from its config."""
    from t2i.pipelines.build import text_model_on_meta

    if device is not None and torch.device(device).type == "meta":
        return text_model_on_meta(cond, cond.path)
    from t2i.text.encoders import build_text_encoder

    encoder = build_text_encoder(
        cond.kind, cond.path, layer=cond.layer, max_length=cond.max_length, arch=cond.arch,
        version=cond.version, attention_mask=cond.attention_mask,
    )  # fmt: skip
    return encoder.to(device) if device is not None else encoder


def build_flow_components(model_cfg: Any, device: str | torch.device | None = None) -> dict[str, nn.Module]:
    """{transformer, vae, context_encoder[, pooled_encoder]} of a `kind: flow` config."""
    cfg = as_model_config(model_cfg)
    parts = {
        "transformer": build_transformer(cfg, device),
        "vae": build_flow_vae(cfg, device),
        "context_encoder": build_text(cfg.context_encoder, device),
    }
    if cfg.pooled_encoder is not None:
        parts["pooled_encoder"] = build_text(cfg.pooled_encoder, device)
    return parts


def assemble_flux_pipeline(
    model_cfg: Any,
    transformer: nn.Module,
    vae: nn.Module,
    context_encoder: nn.Module,
    pooled_encoder: nn.Module | None,
    scheduler_config: dict[str, Any] | None = None,
    freeze: bool = True,
) -> FluxPipeline:
    """A FluxPipeline from built modules and their `model:` config, frozen unless `freeze=False` (a training task's
    previews sample its live transformer)."""
    from t2i.config import config_to_dict

    cfg = as_model_config(model_cfg)
    pipe = FluxPipeline(
        transformer,
        vae,
        context_encoder,
        pooled_encoder,
        scheduler_config or scheduler_config_from_model(cfg),
        cfg.scale_factor,
        cfg.shift_factor,
        config_to_dict(cfg),
        cfg.mask_text_tokens,
        cfg.guidance_scale,
    )
    return pipe.freeze() if freeze else pipe


def pipeline_from_single_file(path: Path, model_cfg: Any, dtype: torch.dtype | None) -> FluxPipeline:
    """A BFL (or ComfyUI) transformer file plus the VAE and text encoders the config's paths name."""
    from t2i.convert.flux_diffusers import load_flux_transformer
    from t2i.convert.vae_diffusers import load_vae

    cfg = as_model_config(model_cfg)
    kwargs = cfg.transformer_config.model_kwargs()
    use_checkpoint = kwargs.pop("use_checkpoint")
    transformer = load_flux_transformer(path, dtype=dtype, config=kwargs, use_checkpoint=use_checkpoint)
    vae_path = cfg.first_stage_config.from_pretrained
    if vae_path is None:
        raise PipelineLoadError(
            f"{path}: model.first_stage_config.from_pretrained is missing; a transformer single file needs the "
            "VAE folder (the vae/ of a diffusers Flux repository)"
        )
    vae = load_vae(vae_path).to(dtype or torch.float32).eval()
    pooled = build_text(cfg.pooled_encoder) if cfg.pooled_encoder is not None else None
    return assemble_flux_pipeline(cfg, transformer, vae, build_text(cfg.context_encoder), pooled)


# ---------------------------------------------------------------------------------------- folders


def read_flux_index(root: Path) -> dict[str, Any]:
    index = read_json(root / MODEL_INDEX)
    missing = [c for c in FLUX_COMPONENTS if not isinstance(index.get(c), list) or index[c][0] is None]
    missing += [c for c in FLUX_COMPONENTS if c not in missing and not (root / c).is_dir()]
    if missing:
        raise PipelineLoadError(
            f"{root}: Flux pipeline folder without {', '.join(missing)}; expected the FluxPipeline layout "
            f"({', '.join(FLUX_COMPONENTS)}, and text_encoder/ + tokenizer/ for CLIP)"
        )
    return index


def _text_options(model_cfg: Any, name: str) -> Any:
    return getattr(model_cfg, name) if model_cfg is not None else None


def load_folder_encoder(
    root: Path,
    sub: str,
    tokenizer_sub: str,
    class_name: str,
    cond: Any,
    variant: str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The text encoder of `root/sub` with the tokenizer of `root/tokenizer_sub`. Without a t2i.yaml a T5 runs
    unmasked at 512 tokens and CLIP at its tokenizer's length (what diffusers' FluxPipeline does)."""
    from t2i.text.encoders import build_clip, build_minilm, build_t5

    kind = cond.kind if cond is not None else TEXT_KIND_OF_CLASS.get(class_name)
    max_length = cond.max_length if cond is not None else None
    if kind == "clip":
        layer = "last" if cond is None else cond.layer
        return build_clip(root / sub, str(root / tokenizer_sub), layer, max_length, variant=variant, dtype=dtype)
    if kind == "t5":
        mask = cond.attention_mask if cond is not None else False
        return build_t5(root / sub, str(root / tokenizer_sub), max_length or 512, attention_mask=mask,
                        variant=variant, dtype=dtype)  # fmt: skip
    if kind == "minilm":
        return build_minilm(root / sub, max_length, dtype=dtype)
    raise PipelineLoadError(
        f"{root / MODEL_INDEX}: {sub} class {class_name!r} is not supported; expected one of "
        f"{', '.join(TEXT_KIND_OF_CLASS)}"
    )


def load_flux_folder(
    root: Path,
    model_cfg: Any = None,
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    text_dtype: torch.dtype = torch.float32,
) -> FluxPipeline:
    """A diffusers or t2i Flux pipeline folder; `model_cfg` (when given) replaces t2i.yaml."""
    from t2i.convert.flux_diffusers import load_flux_transformer
    from t2i.convert.vae_diffusers import load_vae

    index = read_flux_index(root)
    if model_cfg is None and (root / T2I_CONFIG).is_file():
        from t2i.config import load_config

        model_cfg = load_config(root / T2I_CONFIG).model
    scheduler_config = read_json(root / SCHEDULER_CONFIG)
    transformer = load_flux_transformer(root / "transformer", dtype=dtype or torch.float32, variant=variant)
    vae = load_vae(root / "vae", variant=variant).to(dtype or torch.float32).eval()
    weights = {"variant": variant, "dtype": text_dtype}
    context = load_folder_encoder(
        root, "text_encoder_2", "tokenizer_2", index["text_encoder_2"][1], _text_options(model_cfg, "context_encoder"),
        **weights,
    )  # fmt: skip
    pooled = None
    has_clip = isinstance(index.get("text_encoder"), list) and index["text_encoder"][0] is not None
    if has_clip and (model_cfg is None or model_cfg.pooled_encoder is not None):
        pooled = load_folder_encoder(
            root, "text_encoder", "tokenizer", index["text_encoder"][1], _text_options(model_cfg, "pooled_encoder"),
            **weights,
        )  # fmt: skip
    if model_cfg is None:
        model_cfg = derived_model_config(transformer, vae, context, pooled, scheduler_config)
    return assemble_flux_pipeline(model_cfg, transformer, vae, context, pooled, scheduler_config)


def folder_components_on_meta(root: Path) -> dict[str, nn.Module]:
    """Transformer, VAE and text encoders of a Flux folder, built on meta from its config files (`t2i info`)."""
    import transformers

    from t2i.convert.flux_diffusers import flux_config_from_diffusers
    from t2i.convert.vae_diffusers import config_from_diffusers
    from t2i.models.autoencoder import AutoencoderKL
    from t2i.models.flux import FluxTransformer

    index = read_flux_index(root)
    with torch.device("meta"):
        parts: dict[str, nn.Module] = {
            "transformer": FluxTransformer(**flux_config_from_diffusers(read_json(root / "transformer/config.json"))),
            "vae": AutoencoderKL.from_config(config_from_diffusers(read_json(root / "vae/config.json"))),
        }
        for name, sub in (("context_encoder", "text_encoder_2"), ("pooled_encoder", "text_encoder")):
            entry = index.get(sub)
            if isinstance(entry, list) and entry[0] is not None:
                config = transformers.AutoConfig.from_pretrained(str(root / sub), local_files_only=True)
                parts[name] = getattr(transformers, entry[1])(config)
    return parts
