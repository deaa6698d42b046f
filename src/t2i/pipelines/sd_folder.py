"""The Stable Diffusion pipeline folder: the diffusers layout (`model_index.json` + `unet/ vae/ text_encoder/
tokenizer/ scheduler/`) plus t2i's `t2i.yaml`, which holds the resolved `model:` config (text encoder kind,
max_length, training knobs) and is ignored by diffusers. Reading its index and scheduler, deriving a `model:`
config for a diffusers folder, and `save_pipeline`, which writes a folder that both t2i and diffusers load.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from torch import nn

from t2i.atomic import output_folder
from t2i.diffusion.parameterization import DIFFUSERS_PREDICTION, normalize_prediction
from t2i.diffusion.schedules import DiscreteSchedule
from t2i.errors import ConfigError, PipelineLoadError
from t2i.pipelines.build import as_model_config, read_json

MODEL_INDEX = "model_index.json"
T2I_CONFIG = "t2i.yaml"
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SCHEDULER_CONFIG = "scheduler_config.json"
DIFFUSERS_VERSION = "0.30.0"
# The sampler of pipelines built from a t2i config: CompVis' and SD 2's default, with SD's training schedule.
CONFIG_DEFAULT_SAMPLER = "ddim"
# model_index text encoder class -> cond_stage_config.kind when a diffusers folder has no t2i.yaml.
# `model:` keys that describe training, not the saved weights; t2i.yaml keeps them from the source config.
TRAINING_KEYS = (
    "text_drop_rate",
    "min_snr_gamma",
    "offset_noise",
    "optim",
    "lora",
    "first_stage_key",
    "cond_stage_key",
    "channels_last",
    "inductor",
)
TEXT_KIND_OF_CLASS = {
    "CLIPTextModel": "clip",
    "CLIPTextModelWithProjection": "clip",
    "T5EncoderModel": "t5",
    "BertModel": "minilm",
}


def scheduler_config_from_model(model_cfg: Any, sampler: str = CONFIG_DEFAULT_SAMPLER) -> dict[str, Any]:
    """A diffusers scheduler config for `sampler` with the training schedule of a `model:` config."""
    from t2i.diffusion.plans import scheduler_config_for

    class_name, extra = scheduler_config_for(sampler)
    zero_snr = bool(getattr(model_cfg, "zero_terminal_snr", False))
    return {
        "_class_name": class_name,
        "_diffusers_version": DIFFUSERS_VERSION,
        **DiscreteSchedule.from_model_config(model_cfg).scheduler_config(),
        "prediction_type": DIFFUSERS_PREDICTION[normalize_prediction(model_cfg.parameterization)],
        # zero terminal SNR is only reached when sampling starts at t = T: trailing spacing (Lin et al. 2023, 3.3)
        "timestep_spacing": "trailing" if zero_snr else "leading",
        "steps_offset": 0 if zero_snr else 1,
        "set_alpha_to_one": False,
        "clip_sample": False,
        **extra,
    }


def _config_dict(model_cfg: Any) -> dict[str, Any]:
    from t2i.config import config_to_dict

    return config_to_dict(model_cfg)


def read_model_index(root: Path) -> dict[str, Any]:
    """model_index.json of an SD folder; PipelineLoadError when absent or missing a component."""
    if not (root / MODEL_INDEX).is_file():
        raise PipelineLoadError(
            f"{root}: not a pipeline folder (no {MODEL_INDEX}); expected a diffusers or t2i "
            "pipeline folder with unet/, vae/, text_encoder/, tokenizer/, scheduler/"
        )
    try:
        index = read_json(root / MODEL_INDEX)
    except ConfigError as exc:
        raise PipelineLoadError(str(exc)) from None
    missing = [c for c in SD_COMPONENTS if not isinstance(index.get(c), list) or index[c][0] is None]
    if missing:
        raise PipelineLoadError(
            f"{root / MODEL_INDEX}: no {', '.join(missing)} entry; expected a Stable Diffusion "
            f"pipeline with {', '.join(SD_COMPONENTS)} (class {index.get('_class_name')!r})"
        )
    for component in SD_COMPONENTS:
        if not (root / component).is_dir():
            raise PipelineLoadError(f"{root}: missing {component}/ folder listed in {MODEL_INDEX}")
    return index


def read_scheduler_config(root: Path) -> dict[str, Any]:
    file = root / "scheduler" / SCHEDULER_CONFIG
    if not file.is_file():
        raise PipelineLoadError(f"{file}: not found; expected the diffusers scheduler config")
    return read_json(file)


def default_sampler_of(scheduler_config: dict[str, Any]) -> str:
    """The sampler matching the folder's scheduler class; Euler for classes t2i has no twin for."""
    from t2i.diffusion.plans import default_sampler_for
    from t2i.errors import UnknownSamplerError

    try:
        return default_sampler_for(scheduler_config.get("_class_name", ""), scheduler_config)
    except UnknownSamplerError:
        return "euler"


def derived_model_config(
    unet: nn.Module,
    vae: nn.Module,
    text_encoder: nn.Module,
    scheduler_config: dict[str, Any],
    scale_factor: float,
) -> Any:
    """The `model:` config describing a diffusers folder (so it can be saved as t2i.yaml or trained further)."""
    schedule = DiscreteSchedule.from_scheduler_config(scheduler_config)
    return as_model_config(
        {
            "kind": "latent_diffusion",
            "parameterization": normalize_prediction(scheduler_config.get("prediction_type") or "epsilon"),
            "timesteps": schedule.num_train_timesteps,
            "beta_schedule": schedule.beta_schedule,
            "linear_start": schedule.beta_start,
            "linear_end": schedule.beta_end,
            "zero_terminal_snr": schedule.rescale_betas_zero_snr,
            "scale_factor": float(scale_factor),
            "unet_config": {**unet.unet_config, "from_pretrained": None},
            "first_stage_config": {
                "embed_dim": vae.embed_dim,
                "from_pretrained": None,
                "ddconfig": dict(vae.ddconfig),
            },
            "cond_stage_config": _saved_cond_stage(text_encoder),
        }
    )


def _saved_cond_stage(text_encoder: nn.Module) -> dict[str, Any]:
    """cond_stage_config describing the text encoder as `save_pipeline` writes it (a plain HF folder)."""
    kind = "clip" if text_encoder.kind == "openclip" else text_encoder.kind
    return {
        "kind": kind,
        "path": None,
        "layer": "last",
        "max_length": text_encoder.max_length,
        "arch": None,
        "version": None,
    }


def save_pipeline(pipe: Any, path: str | Path) -> Path:
    """Write `pipe` as a t2i pipeline folder: diffusers layout (model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/) + t2i.yaml. Returns the folder. (SDXL pipelines: `sdxl_folder.save_sdxl_pipeline`.)"""
    from t2i.convert.unet_diffusers import save_unet_as_diffusers

    root = output_folder(path, "pipeline")
    save_unet_as_diffusers(pipe.unet, root / "unet")
    _save_vae(pipe.vae, pipe.scale_factor, root / "vae")
    text_class, tokenizer_class = _save_text_encoder(pipe.text_encoder, root)
    scheduler = _save_scheduler(pipe, root / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "text_encoder": ["transformers", text_class],
        "tokenizer": ["transformers", tokenizer_class],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / MODEL_INDEX).write_text(json.dumps(index, indent=2))
    _save_t2i_config(pipe, scheduler, root / T2I_CONFIG)
    return root


def _save_vae(vae: nn.Module, scale_factor: float, folder: Path) -> None:
    from safetensors.torch import save_file

    from t2i.convert.vae_diffusers import config_to_diffusers, state_dict_to_diffusers

    folder.mkdir(parents=True, exist_ok=True)
    config = config_to_diffusers({**vae.config_dict(), "scale_factor": scale_factor})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict_to_diffusers(vae.state_dict()).items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))


def _penultimate_as_last(model: nn.Module) -> nn.Module:
    """A CLIPTextModel without its last layer: its `last_hidden_state` (through final_layer_norm) is then the
    original's penultimate layer through final_layer_norm, which is what SD 2 conditions on."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers -= 1
    last = f"encoder.layers.{config.num_hidden_layers}."
    state = {
        k: v for k, v in model.state_dict().items() if not k.removeprefix("text_model.").startswith(last)
    }
    truncated = type(model)(config)
    truncated.load_state_dict(state)
    return truncated


def _save_text_encoder(encoder: nn.Module, root: Path) -> tuple[str, str]:
    """Write text_encoder/ and tokenizer/ in HF format; returns (model class, tokenizer class) names.

    BERT/T5 get `use_attention_mask: true` and the tokenizer pads to our max_length, so diffusers' pipeline
    encodes prompts exactly as t2i does.
    """
    model = encoder.model
    if getattr(encoder, "layer", "last") == "penultimate":
        model = _penultimate_as_last(model)
    if encoder.kind in ("t5", "minilm"):
        model.config.use_attention_mask = True
    model.save_pretrained(str(root / "text_encoder"))
    tokenizer = encoder.tokenizer
    tokenizer.model_max_length = encoder.max_length
    tokenizer.save_pretrained(str(root / "tokenizer"))
    return type(model).__name__, type(tokenizer).__name__


def _save_scheduler(pipe: Any, folder: Path) -> dict[str, Any]:
    """scheduler_config.json for the pipeline's default sampler (the loaded config kept when it already is)."""
    from t2i.diffusion.plans import scheduler_config_for

    class_name, extra = scheduler_config_for(pipe.default_sampler)
    config = dict(pipe.scheduler_config)
    if default_sampler_of(config) != pipe.default_sampler or config.get("_class_name") != class_name:
        config = {**config, "_class_name": class_name, **extra}
    config.setdefault("_diffusers_version", DIFFUSERS_VERSION)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SCHEDULER_CONFIG).write_text(json.dumps(config, indent=2))
    return config


def _save_t2i_config(pipe: Any, scheduler: dict[str, Any], file: Path) -> None:
    """t2i.yaml: the `model:` section describing exactly what was written (text encoder as saved)."""
    from omegaconf import OmegaConf

    base = pipe.model_config or {}
    model = _config_dict(
        derived_model_config(pipe.unet, pipe.vae, pipe.text_encoder, scheduler, pipe.scale_factor)
    )
    model.update({k: base[k] for k in TRAINING_KEYS if k in base})
    file.write_text(OmegaConf.to_yaml(OmegaConf.create({"model": model})))
