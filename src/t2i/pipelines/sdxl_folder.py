"""The SDXL pipeline folder: diffusers' StableDiffusionXLPipeline layout (`model_index.json` + `unet/ vae/
text_encoder/ tokenizer/ text_encoder_2/ tokenizer_2/ scheduler/`; the refiner, a StableDiffusionXLImg2ImgPipeline,
has no `text_encoder/` and `tokenizer/`) plus t2i's `t2i.yaml`.

What model_index.json and the UNet config say becomes the conditioner: `force_zeros_for_empty_prompt` (dropped
text and an absent negative prompt are zeros; otherwise the encoding of ""), `requires_aesthetics_score` (the
refiner's y ends in original size, crop, aesthetic score; the base's in original size, crop, target size) and
`addition_time_embed_dim` (the width of each size embedding). Both text encoders give hidden_states[-2] (no final
norm); the pooled, projected output of `text_encoder_2` starts y.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.atomic import output_folder
from t2i.errors import ConfigError, PipelineLoadError
from t2i.pipelines.build import as_model_config, read_json
from t2i.pipelines.sd_folder import (
    DIFFUSERS_VERSION,
    MODEL_INDEX,
    T2I_CONFIG,
    TRAINING_KEYS,
    _config_dict,
    _save_scheduler,
    _save_vae,
    default_sampler_of,
    read_scheduler_config,
)

TEXT_NAMES = ("text_encoder", "text_encoder_2")
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
SDXL_LAYER = "penultimate_hidden"  # diffusers' SDXL pipelines condition on hidden_states[-2]
BASE_SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
REFINER_SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "aesthetic_score")
VALUES_PER_KEY = {"original_size_as_tuple": 2, "crop_coords_top_left": 2, "target_size_as_tuple": 2,
                  "aesthetic_score": 1}  # fmt: skip
TEXT_UCG_RATE = 0.1  # what a derived config trains with (sgm's and NeMo's text dropout)


def _present(index: dict[str, Any], name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def is_sdxl_folder(root: Path) -> bool:
    """Whether `root/model_index.json` lists a `text_encoder_2` (StableDiffusionXL(Img2Img)Pipeline)."""
    file = root / MODEL_INDEX
    if not file.is_file():
        return False
    try:
        return _present(read_json(file), "text_encoder_2")
    except ConfigError:
        return False


def read_sdxl_index(root: Path) -> dict[str, Any]:
    """model_index.json of an SDXL folder, with every listed component's folder present."""
    index = read_json(root / MODEL_INDEX)
    required = ["unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"]
    if _present(index, "text_encoder"):
        required += ["text_encoder", "tokenizer"]
    missing = [c for c in required if not _present(index, c) or not (root / c).is_dir()]
    if missing:
        raise PipelineLoadError(
            f"{root}: SDXL folder without {', '.join(missing)}; expected {', '.join(required)} listed in "
            f"{MODEL_INDEX} and present as folders"
        )
    return index


# ------------------------------------------------------------------------------------------ loading


def load_sdxl_components(
    root: Path,
    model_cfg: Any,
    dtype: torch.dtype | None,
    variant: str | None = None,
    text_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """The `LatentPipeline` keyword arguments of a diffusers or t2i SDXL folder; `model_cfg` (when given)
    replaces t2i.yaml."""
    from t2i.convert.unet_diffusers import addition_time_embed_dim, load_unet_from_diffusers
    from t2i.convert.vae_diffusers import load_vae

    index = read_sdxl_index(root)
    if model_cfg is None and (root / T2I_CONFIG).is_file():
        model_cfg = as_model_config(root / T2I_CONFIG)
    if model_cfg is not None and model_cfg.conditioner_config is None:
        raise ConfigError(f"{root}: an SDXL folder needs a config with model.conditioner_config (e.g. sdxl)")
    scheduler_config = read_scheduler_config(root)
    dtype = dtype or torch.float32
    unet = load_unet_from_diffusers(root / "unet", dtype=dtype, variant=variant)
    vae = load_vae(root / "vae", variant=variant).to(dtype).eval()
    scale_factor = vae.scale_factor if vae.scale_factor is not None else 0.13025
    names = [name for name in TEXT_NAMES if _present(index, name)]
    encoders = {
        name: _load_text_encoder(root, name, _text_settings(model_cfg, names, name), variant, text_dtype)
        for name in names
    }
    if model_cfg is None:
        outdim = addition_time_embed_dim(read_json(root / "unet" / "config.json"))
        size_keys = _size_keys(index, unet, encoders["text_encoder_2"].pooled_dim, outdim, root)
        force_zeros = bool(index.get("force_zeros_for_empty_prompt", True))
        model_cfg = sdxl_model_config(unet, vae, encoders, scheduler_config, scale_factor, size_keys, outdim,
                                      force_zeros)  # fmt: skip
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": encoders.get("text_encoder"),
        "scheduler_config": scheduler_config,
        "scale_factor": scale_factor,
        "default_sampler": default_sampler_of(scheduler_config),
        "model_config": _config_dict(model_cfg),
        "text_encoder_2": encoders["text_encoder_2"],
    }


def _text_settings(model_cfg: Any, names: list[str], name: str) -> tuple[str | int, int | None]:
    """(layer, max_length) of text encoder `name`: from the config's text embedder at its position, else
    diffusers' (hidden_states[-2], the tokenizer's model_max_length)."""
    if model_cfg is None:
        return SDXL_LAYER, None
    texts = [e.emb_model for e in model_cfg.embedders() if e.is_text]
    if len(texts) != len(names):
        raise ConfigError(
            f"model.conditioner_config.emb_models: {len(texts)} text embedders, but the folder has "
            f"{len(names)} text encoders ({', '.join(names)})"
        )
    emb = texts[names.index(name)]
    if emb.kind not in ("clip", "openclip"):
        raise ConfigError(f"model.conditioner_config: text embedder kind {emb.kind!r}; an SDXL folder holds CLIP")
    return emb.layer, emb.max_length


def _load_text_encoder(
    root: Path, name: str, settings: tuple[str | int, int | None], variant: str | None, dtype: torch.dtype
) -> nn.Module:
    from t2i.text.encoders import build_clip

    layer, max_length = settings
    return build_clip(root / name, str(root / TOKENIZER_OF[name]), layer, max_length, variant=variant, dtype=dtype)


def _size_keys(
    index: dict[str, Any], unet: nn.Module, pooled_dim: int, outdim: int | None, root: Path
) -> tuple[str, ...]:
    """The micro-conditioning inputs of y: the refiner's when model_index.json says `requires_aesthetics_score`
    (or, without the key, when y holds 5 values), else the base's; checked against the UNet's y width."""
    adm = unet.unet_config.get("adm_in_channels")
    if outdim is None or adm is None:
        raise PipelineLoadError(f"{root / 'unet'}: not a text_time UNet; an SDXL folder needs one")
    values = (int(adm) - pooled_dim) / outdim
    aesthetic = index.get("requires_aesthetics_score")
    keys = REFINER_SIZE_KEYS if (aesthetic if aesthetic is not None else values == 5) else BASE_SIZE_KEYS
    if values != sum(VALUES_PER_KEY[k] for k in keys):
        raise PipelineLoadError(
            f"{root / 'unet'}: projection_class_embeddings_input_dim {adm} != pooled text {pooled_dim} + "
            f"{sum(VALUES_PER_KEY[k] for k in keys)} time ids x {outdim}; expected an SDXL base or refiner"
        )
    return keys


def sdxl_model_config(
    unet: nn.Module,
    vae: nn.Module,
    encoders: dict[str, nn.Module],
    scheduler_config: dict[str, Any],
    scale_factor: float,
    size_keys: tuple[str, ...],
    outdim: int,
    force_zeros: bool,
    ucg_rates: list[float] | None = None,
) -> Any:
    """The `model:` config describing an SDXL folder: the SD keys plus `conditioner_config` (its text encoders
    as HF CLIP models, pooled from `text_encoder_2`, then the size embedders)."""
    from t2i.pipelines.sd_folder import derived_model_config

    text = next(iter(encoders.values()))
    base = _config_dict(derived_model_config(unet, vae, text, scheduler_config, scale_factor))
    emb_models = [
        {
            "input_key": "captions",
            "ucg_rate": TEXT_UCG_RATE,
            "legacy_ucg_value": None if force_zeros else "",
            "emb_model": {
                "kind": "clip",
                "path": None,
                "layer": encoder.layer,
                "max_length": encoder.max_length,
                "always_return_pooled": name == "text_encoder_2",
            },
        }
        for name, encoder in encoders.items()
    ]
    emb_models += [{"input_key": k, "ucg_rate": 0.0, "emb_model": {"kind": "size", "outdim": outdim}} for k in size_keys]
    if ucg_rates is not None and len(ucg_rates) == len(emb_models):
        for emb, rate in zip(emb_models, ucg_rates, strict=True):
            emb["ucg_rate"] = rate
    return as_model_config({**base, "conditioner_config": {"emb_models": emb_models}})


# ------------------------------------------------------------------------------------------ saving


def save_sdxl_pipeline(pipe: Any, path: str | Path) -> Path:
    """Write an SDXL `pipe` as a t2i pipeline folder that diffusers' StableDiffusionXLPipeline (refiner:
    StableDiffusionXLImg2ImgPipeline) loads: the diffusers layout + t2i.yaml. Returns the folder."""
    from t2i.convert.unet_diffusers import save_unet_as_diffusers

    path = output_folder(path, "pipeline")
    conditioner = pipe.conditioner
    size_keys, outdim = _size_layout(conditioner)
    encoders = pipe.text_encoders
    if list(encoders) not in (list(TEXT_NAMES), ["text_encoder_2"]):
        raise ConfigError(
            f"model.conditioner_config: text encoders {list(encoders)}; a diffusers SDXL folder holds "
            "text_encoder + text_encoder_2 (base) or text_encoder_2 alone (refiner)"
        )
    refiner = "aesthetic_score" in size_keys
    if tuple(size_keys) != (REFINER_SIZE_KEYS if refiner else BASE_SIZE_KEYS):
        raise ConfigError(
            f"model.conditioner_config: size inputs {list(size_keys)}; diffusers' SDXL pipelines take "
            f"{list(BASE_SIZE_KEYS)} (base) or {list(REFINER_SIZE_KEYS)} (refiner)"
        )
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    save_unet_as_diffusers(pipe.unet, root / "unet", outdim)
    _save_vae(pipe.vae, pipe.scale_factor, root / "vae")
    classes = {name: save_clip_encoder(encoder, root, name) for name, encoder in encoders.items()}
    scheduler = _save_scheduler(pipe, root / "scheduler")
    force_zeros = conditioner.zeros_for_empty_negative
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "force_zeros_for_empty_prompt": force_zeros,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if refiner:
        index["requires_aesthetics_score"] = True
    for name in TEXT_NAMES:
        model_class, tokenizer_class = classes.get(name, (None, None))
        index[name] = ["transformers", model_class] if model_class else [None, None]
        index[TOKENIZER_OF[name]] = ["transformers", tokenizer_class] if tokenizer_class else [None, None]
    (root / MODEL_INDEX).write_text(json.dumps(dict(sorted(index.items())), indent=2))
    rates = [e.drop_rate for e in conditioner.embedders]
    model = _config_dict(sdxl_model_config(pipe.unet, pipe.vae, encoders, scheduler, pipe.scale_factor, size_keys,
                                           outdim, force_zeros, rates))  # fmt: skip
    base = pipe.model_config or {}
    model.update({k: base[k] for k in TRAINING_KEYS if k in base})
    from omegaconf import OmegaConf

    (root / T2I_CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create({"model": model})))
    return root


def _size_layout(conditioner: Any) -> tuple[list[str], int]:
    """(size input keys in order, their common embedding width) of an SDXL conditioner."""
    from t2i.text.conditioner import SizeEmbedder

    sizes = [e for e in conditioner.embedders if isinstance(e, SizeEmbedder)]
    widths = {e.outdim for e in sizes}
    if len(widths) != 1:
        raise ConfigError(
            f"model.conditioner_config: size embedders with widths {sorted(widths)}; a diffusers SDXL UNet has "
            "one addition_time_embed_dim"
        )
    return [e.input_key for e in sizes], widths.pop()


def save_clip_encoder(encoder: nn.Module, root: Path, name: str) -> tuple[str, str]:
    """Write a CLIP text encoder as `root/name` (CLIPTextModel, or CLIPTextModelWithProjection when it has a
    projection) and its tokenizer as `root/tokenizer[_2]`; returns (model class, tokenizer class)."""
    from transformers import CLIPTextModelWithProjection

    from t2i.text.encoders import fit_text_model_prefix

    if getattr(encoder, "layer", None) != SDXL_LAYER:
        raise ConfigError(
            f"model.conditioner_config: {name} uses layer {getattr(encoder, 'layer', None)!r}; diffusers' SDXL "
            f"pipelines condition on {SDXL_LAYER} (hidden_states[-2])"
        )
    model = encoder.model
    if encoder.text_projection is not None:
        config = type(model.config).from_dict(
            {**model.config.to_dict(), "projection_dim": encoder.text_projection.out_features}
        )
        config.architectures = ["CLIPTextModelWithProjection"]
        with_projection = CLIPTextModelWithProjection(config)
        with_projection.text_model.load_state_dict(fit_text_model_prefix(model.state_dict(), with_projection.text_model))
        with_projection.text_projection.load_state_dict(encoder.text_projection.state_dict())
        model = with_projection
    model.save_pretrained(str(root / name))
    tokenizer = encoder.tokenizer
    tokenizer.model_max_length = encoder.max_length
    tokenizer.save_pretrained(str(root / TOKENIZER_OF[name]))
    return type(model).__name__, type(tokenizer).__name__
