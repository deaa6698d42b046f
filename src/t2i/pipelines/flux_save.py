"""Writing a Flux pipeline as a diffusers `FluxPipeline` folder (+ t2i's `t2i.yaml`; the files t2i writes itself
go through `t2i.atomic`), and the `kind: flow` config that describes loaded modules. diffusers' `text_encoder`
(CLIP) holds the config's `pooled_encoder`, `text_encoder_2` (T5) its `context_encoder`; a pipeline without a
pooled encoder writes no `text_encoder/`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from t2i.atomic import atomic_write, output_folder, write_safetensors
from t2i.pipelines.build import as_model_config

MODEL_INDEX = "model_index.json"
T2I_CONFIG = "t2i.yaml"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
DIFFUSERS_VERSION = "0.30.0"
# `model:` keys that describe training, not the saved weights; t2i.yaml keeps them from the source config.
TRAINING_KEYS = ("loss", "text_drop_rate", "optim", "lora", "first_stage_key", "cond_stage_key", "inductor")


def _saved_text(encoder: nn.Module) -> dict[str, Any]:
    """The text-encoder section describing `encoder` as `save_flux_pipeline` writes it (a plain HF folder)."""
    return {
        "kind": encoder.kind,
        "path": None,
        "layer": getattr(encoder, "layer", "last"),
        "max_length": encoder.max_length,
        "arch": None,
        "version": None,
        "attention_mask": getattr(encoder, "attention_mask", True),
    }


def derived_model_config(
    transformer: nn.Module,
    vae: nn.Module,
    context_encoder: nn.Module,
    pooled_encoder: nn.Module | None,
    scheduler_config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Any:
    """The `kind: flow` config describing loaded modules (so they can be saved as t2i.yaml or trained further)."""
    from t2i.diffusion.schedules import FlowSchedule

    vae_config = vae.config_dict()
    model = {
        "kind": "flow",
        "transformer_config": {"kind": "flux", **transformer.flux_config, "from_pretrained": None},
        "first_stage_config": {
            "embed_dim": vae.embed_dim,
            "from_pretrained": None,
            "ddconfig": dict(vae.ddconfig),
            "use_quant_conv": vae_config["use_quant_conv"],
            "use_post_quant_conv": vae_config["use_post_quant_conv"],
        },
        "scale_factor": float(vae.scale_factor if vae.scale_factor is not None else 1.0),
        "shift_factor": float(vae.shift_factor or 0.0),
        "context_encoder": _saved_text(context_encoder),
        "pooled_encoder": _saved_text(pooled_encoder) if pooled_encoder is not None else None,
        "schedule": FlowSchedule.from_scheduler_config(scheduler_config).scheduler_config(),
        **(extra or {}),
    }
    return as_model_config(model)


def save_flux_pipeline(pipe: Any, path: str | Path) -> Path:
    """Write `pipe` in the FluxPipeline layout + t2i.yaml. Returns the folder."""
    from omegaconf import OmegaConf

    from t2i.config import config_to_dict
    from t2i.convert.flux_diffusers import save_flux_transformer_as_diffusers

    root = output_folder(path, "pipeline")
    save_flux_transformer_as_diffusers(pipe.transformer, root / "transformer")
    _save_vae(pipe, root / "vae")
    context = _save_text(pipe.context_encoder, root, "text_encoder_2", "tokenizer_2")
    pooled = (
        _save_text(pipe.pooled_encoder, root, "text_encoder", "tokenizer") if pipe.pooled_encoder else (None, None)
    )
    (root / "scheduler").mkdir(exist_ok=True)
    scheduler = {"_diffusers_version": DIFFUSERS_VERSION, **pipe.scheduler_config}
    _write_text(root / SCHEDULER_CONFIG, json.dumps(scheduler, indent=2))
    index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", scheduler.get("_class_name", "FlowMatchEulerDiscreteScheduler")],
        "text_encoder": ["transformers", pooled[0]] if pooled[0] else [None, None],
        "tokenizer": ["transformers", pooled[1]] if pooled[1] else [None, None],
        "text_encoder_2": ["transformers", context[0]],
        "tokenizer_2": ["transformers", context[1]],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }
    _write_text(root / MODEL_INDEX, json.dumps(index, indent=2))
    base = pipe.model_config or {}
    described = derived_model_config(
        pipe.transformer, pipe.vae, pipe.context_encoder, pipe.pooled_encoder, pipe.scheduler_config,
        {"mask_text_tokens": pipe.mask_text_tokens, "guidance_scale": pipe.default_guidance,
         "scale_factor": pipe.scale_factor, "shift_factor": pipe.shift_factor},
    )  # fmt: skip
    model = config_to_dict(described)
    model.update({k: base[k] for k in TRAINING_KEYS if k in base})
    _write_text(root / T2I_CONFIG, OmegaConf.to_yaml(OmegaConf.create({"model": model})))
    return root


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def _save_vae(pipe: Any, folder: Path) -> None:
    from t2i.convert.vae_diffusers import config_to_diffusers, state_dict_to_diffusers

    folder.mkdir(parents=True, exist_ok=True)
    config = {**pipe.vae.config_dict(), "scale_factor": pipe.scale_factor, "shift_factor": pipe.shift_factor}
    _write_text(folder / "config.json", json.dumps(config_to_diffusers(config), indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict_to_diffusers(pipe.vae.state_dict()).items()}
    atomic_write(folder / "diffusion_pytorch_model.safetensors", lambda handle: write_safetensors(handle, state))


def _save_text(encoder: nn.Module, root: Path, sub: str, tokenizer_sub: str) -> tuple[str, str]:
    """Write an HF text encoder and its tokenizer (padding to the encoder's length); (model, tokenizer) classes."""
    model = encoder.model
    model.save_pretrained(str(root / sub))
    tokenizer = encoder.tokenizer
    tokenizer.model_max_length = encoder.max_length
    tokenizer.save_pretrained(str(root / tokenizer_sub))
    return type(model).__name__, type(tokenizer).__name__
