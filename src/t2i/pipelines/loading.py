"""`load_pipeline`: one entry point for the three on-disk forms of a Stable Diffusion model, and the writer.

1. A diffusers SD folder: `model_index.json` + `unet/ vae/ text_encoder/ tokenizer/ scheduler/`. Its scheduler
   config picks the default sampler and fixes the schedule every sampler follows.
2. A single-file original checkpoint (`.safetensors`, or `.ckpt` read with `weights_only=True`) with CompVis /
   NeMo key names, plus `config=` naming its architecture (`sd15`, `sd2`, `sd21-v` or a YAML path).
3. A t2i pipeline folder: the diffusers layout plus `t2i.yaml`, holding the resolved `model:` config (text
   encoder kind, max_length, training knobs). It loads in diffusers too, since the extra file is ignored there.

`save_pipeline` writes form 3, so everything t2i exports loads in both t2i and diffusers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.errors import ConfigError, PipelineLoadError
from t2i.pipelines.build import as_model_config, read_json
from t2i.pipelines.latent import PARAMETERIZATION_OF, LatentPipeline
from t2i.pipelines.single_file import SINGLE_FILE_SUFFIXES, load_single_file

MODEL_INDEX = "model_index.json"
T2I_CONFIG = "t2i.yaml"
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SCHEDULER_CONFIG = "scheduler_config.json"
DIFFUSERS_VERSION = "0.30.0"
# The sampler of pipelines built from a t2i config: CompVis' and SD 2's default, with SD's training schedule.
CONFIG_DEFAULT_SAMPLER = "ddim"
PREDICTION_OF = {v: k for k, v in PARAMETERIZATION_OF.items()}
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


def load_pipeline(
    path: str | Path,
    config: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    overrides: list[str] | None = None,
) -> LatentPipeline:
    """Load a diffusers folder, a t2i pipeline folder or a single-file checkpoint as a `LatentPipeline`.

    Args:
        path: the folder or file.
        config: for a single file (required): a config name (`sd15`, `sd2`, `sd21-v`), a YAML path, or a `model:`
            section (dict / dataclass). For a folder (optional): replaces the folder's `t2i.yaml`.
        device: where to move the pipeline (default: stays on the CPU).
        dtype: UNet and VAE weight dtype (default float32).
        overrides: dotted `key=value` overrides applied to a named/YAML config (e.g.
            `model.cond_stage_config.path=/tokenizer/dir`).
    """
    path = Path(path)
    if not path.exists():
        raise PipelineLoadError(
            f"{path}: no such file or folder; expected a pipeline folder or a checkpoint file"
        )
    model_cfg = _model_config(config, overrides) if config is not None else None
    if path.is_dir():
        pipe = load_folder(path, model_cfg, dtype)
    elif path.suffix in SINGLE_FILE_SUFFIXES:
        if model_cfg is None:
            raise PipelineLoadError(
                f"{path}: a single-file checkpoint needs config= (sd15, sd2, sd21-v or a YAML "
                "path) describing its architecture"
            )
        pipe = pipeline_from_single_file(path, model_cfg, dtype)
    else:
        raise PipelineLoadError(
            f"{path}: unknown file type {path.suffix!r}; expected a pipeline folder or one of "
            f"{', '.join(SINGLE_FILE_SUFFIXES)}"
        )
    return pipe.to(device) if device is not None else pipe


def _model_config(config: Any, overrides: list[str] | None) -> Any:
    if isinstance(config, (str, Path)):
        from t2i.config import load_config

        return load_config(config, overrides or []).model
    if overrides:
        raise ConfigError(
            "overrides: only apply to a config name or YAML path; edit the config object instead"
        )
    return as_model_config(config)


# ------------------------------------------------------------------------------------------ single file


def scheduler_config_from_model(model_cfg: Any, sampler: str = CONFIG_DEFAULT_SAMPLER) -> dict[str, Any]:
    """A diffusers scheduler config for `sampler` with the training schedule of a `model:` config."""
    from t2i.diffusion.plans import scheduler_config_for

    class_name, extra = scheduler_config_for(sampler)
    return {
        "_class_name": class_name,
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": model_cfg.timesteps,
        "beta_start": model_cfg.linear_start,
        "beta_end": model_cfg.linear_end,
        "beta_schedule": model_cfg.beta_schedule,
        "trained_betas": None,
        "prediction_type": PREDICTION_OF[model_cfg.parameterization],
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "clip_sample": False,
        **extra,
    }


def assemble_pipeline(
    model_cfg: Any,
    unet: nn.Module,
    vae: nn.Module,
    text_encoder: nn.Module,
    sampler: str = CONFIG_DEFAULT_SAMPLER,
) -> LatentPipeline:
    """A pipeline from built modules and their `model:` config (what a training run exports), with SD's
    schedule for `sampler` as its scheduler config."""
    model_cfg = as_model_config(model_cfg)
    return LatentPipeline(
        unet,
        vae,
        text_encoder,
        scheduler_config_from_model(model_cfg, sampler),
        model_cfg.scale_factor,
        sampler,
        _config_dict(model_cfg),
    )


def pipeline_from_single_file(path: Path, model_cfg: Any, dtype: torch.dtype | None) -> LatentPipeline:
    parts = load_single_file(path, model_cfg, dtype)
    return assemble_pipeline(model_cfg, parts["unet"], parts["vae"], parts["text_encoder"])


def _config_dict(model_cfg: Any) -> dict[str, Any]:
    from t2i.config import config_to_dict

    return config_to_dict(model_cfg)


# ------------------------------------------------------------------------------------------ folders


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


def load_folder(root: Path, model_cfg: Any, dtype: torch.dtype | None) -> LatentPipeline:
    """A diffusers or t2i folder; `model_cfg` (when given) replaces t2i.yaml."""
    from t2i.convert.unet_diffusers import load_unet_from_diffusers
    from t2i.convert.vae_diffusers import load_vae

    index = read_model_index(root)
    if model_cfg is None and (root / T2I_CONFIG).is_file():
        model_cfg = _model_config(root / T2I_CONFIG, None)
    scheduler_config = read_scheduler_config(root)
    dtype = dtype or torch.float32
    unet = load_unet_from_diffusers(root / "unet", dtype=dtype)
    vae = load_vae(root / "vae").to(dtype).eval()
    scale_factor = vae.scale_factor if vae.scale_factor is not None else 0.18215
    text_encoder = load_folder_text_encoder(root, index, model_cfg)
    if model_cfg is None:
        model_cfg = derived_model_config(unet, vae, text_encoder, scheduler_config, scale_factor)
    return LatentPipeline(
        unet,
        vae,
        text_encoder,
        scheduler_config,
        scale_factor,
        default_sampler_of(scheduler_config),
        _config_dict(model_cfg),
    )


def load_folder_text_encoder(root: Path, index: dict[str, Any], model_cfg: Any) -> nn.Module:
    """The text encoder of `root/text_encoder` with the tokenizer of `root/tokenizer`.

    With a t2i.yaml its cond_stage_config gives kind, layer and max_length; otherwise the kind follows the class
    in model_index.json and max_length is the tokenizer's `model_max_length` (what diffusers pads to).
    """
    from t2i.text.encoders import MaskedMeanEncoder, build_clip, load_hf_model
    from t2i.text.tokenize import load_tokenizer

    class_name = index["text_encoder"][1]
    if model_cfg is not None:
        cond = model_cfg.cond_stage_config
        kind, layer, max_length = cond.kind, str(cond.layer), cond.max_length
    else:
        kind, layer, max_length = TEXT_KIND_OF_CLASS.get(class_name), "last", None
    if kind in ("clip", "openclip"):
        return build_clip(root, None, layer, max_length)
    if kind not in ("t5", "minilm"):
        raise PipelineLoadError(
            f"{root / MODEL_INDEX}: text_encoder class {class_name!r} is not supported; "
            f"expected one of {', '.join(TEXT_KIND_OF_CLASS)}"
        )
    import transformers

    tokenizer = load_tokenizer(root / "tokenizer")
    model_class = getattr(transformers, class_name, transformers.AutoModel)
    model = load_hf_model(model_class, root / "text_encoder", f"a {class_name} folder")
    return MaskedMeanEncoder(
        model,
        tokenizer,
        max_length or tokenizer.model_max_length,
        kind=kind,
        normalize_pooled=kind == "minilm",
    )


def derived_model_config(
    unet: nn.Module,
    vae: nn.Module,
    text_encoder: nn.Module,
    scheduler_config: dict[str, Any],
    scale_factor: float,
) -> Any:
    """The `model:` config describing a diffusers folder (so it can be saved as t2i.yaml or trained further)."""
    from t2i.diffusion.denoisers import normalize_prediction_type

    prediction = normalize_prediction_type(scheduler_config.get("prediction_type", "epsilon"))
    schedule = scheduler_config.get("beta_schedule", "linear")
    return as_model_config(
        {
            "kind": "latent_diffusion",
            "parameterization": PARAMETERIZATION_OF[prediction],
            "timesteps": int(scheduler_config.get("num_train_timesteps", 1000)),
            "beta_schedule": schedule,
            "linear_start": float(scheduler_config.get("beta_start", 0.0001)),
            "linear_end": float(scheduler_config.get("beta_end", 0.02)),
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


# ------------------------------------------------------------------------------------------ saving


def save_pipeline(pipe: LatentPipeline, path: str | Path) -> Path:
    """Write `pipe` as a t2i pipeline folder: diffusers layout (model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/) + t2i.yaml. Returns the folder."""
    from t2i.convert.unet_diffusers import save_unet_as_diffusers

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
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


def _save_scheduler(pipe: LatentPipeline, folder: Path) -> dict[str, Any]:
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


def _save_t2i_config(pipe: LatentPipeline, scheduler: dict[str, Any], file: Path) -> None:
    """t2i.yaml: the `model:` section describing exactly what was written (text encoder as saved)."""
    from omegaconf import OmegaConf

    base = pipe.model_config or {}
    model = _config_dict(
        derived_model_config(pipe.unet, pipe.vae, pipe.text_encoder, scheduler, pipe.scale_factor)
    )
    model.update({k: base[k] for k in TRAINING_KEYS if k in base})
    file.write_text(OmegaConf.to_yaml(OmegaConf.create({"model": model})))
