"""`load_pipeline`: one entry point for the three on-disk forms of a Stable Diffusion model (and of a Flux model:
`t2i.pipelines.flux_folder` reads diffusers' FluxPipeline folders and BFL single files with a `kind: flow` config).

1. A diffusers SD folder: `model_index.json` + `unet/ vae/ text_encoder/ tokenizer/ scheduler/`. Its scheduler
   config picks the default sampler and fixes the schedule every sampler follows. An SDXL folder (with
   `text_encoder_2/ tokenizer_2/`; the refiner without `text_encoder/`) is read by `t2i.pipelines.sdxl_folder`.
2. A single-file original checkpoint (`.safetensors`, or `.ckpt` read with `weights_only=True`) with CompVis /
   NeMo key names, plus `config=` naming its architecture (`sd15`, `sd2`, `sd21-v` or a YAML path).
3. A t2i pipeline folder: the diffusers layout plus `t2i.yaml` (`t2i.pipelines.sd_folder`, which also writes it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.errors import ConfigError, PipelineLoadError, checked_arguments
from t2i.pipelines.build import as_model_config
from t2i.pipelines.latent import LatentPipeline
from t2i.pipelines.sd_folder import (
    CONFIG_DEFAULT_SAMPLER,
    MODEL_INDEX,
    T2I_CONFIG,
    TEXT_KIND_OF_CLASS,
    _config_dict,
    default_sampler_of,
    derived_model_config,
    read_model_index,
    read_scheduler_config,
    scheduler_config_from_model,
)
from t2i.pipelines.single_file import SINGLE_FILE_SUFFIXES, load_single_file


@checked_arguments
def load_pipeline(
    path: str | Path,
    config: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    overrides: list[str] | None = None,
    variant: str | None = None,
) -> LatentPipeline:
    """Load a diffusers folder, a t2i pipeline folder or a single-file checkpoint as a `LatentPipeline` (a
    `FluxPipeline` for Flux folders and `kind: flow` configs).

    Args:
        path: the folder or file.
        config: for a single file (required): a config name (`sd15`, `sd2`, `sd21-v`), a YAML path, or a `model:`
            section (dict / dataclass). For a folder (optional): replaces the folder's `t2i.yaml`.
        device: where to move the pipeline (default: stays on the CPU).
        dtype: UNet and VAE weight dtype (default float32).
        overrides: dotted `key=value` overrides applied to a named/YAML config (e.g.
            `model.cond_stage_config.path=/tokenizer/dir`).
        variant: a folder's weight files of this variant (`fp16`: `diffusion_pytorch_model.fp16.safetensors`,
            `model.fp16.safetensors`), as diffusers' `variant=`.

    Text encoders are held in float32 on the CPU whatever their files store; on another device in `dtype`.
    """
    if not isinstance(path, (str, Path)) or not str(path):
        raise PipelineLoadError(f"path: {path!r}; expected the path of a pipeline folder or a checkpoint file")
    path = Path(path)
    if not path.exists():
        raise PipelineLoadError(
            f"{path}: no such file or folder; expected a pipeline folder or a checkpoint file"
        )
    model_cfg = _model_config(config, overrides) if config is not None else None
    text_dtype = text_dtype_for(device, dtype)
    if path.is_dir():
        pipe = load_folder(path, model_cfg, dtype, variant=variant, text_dtype=text_dtype)
    elif variant is not None:
        raise PipelineLoadError(f"variant: {variant!r} applies to folders; {path} is a single file")
    elif path.suffix in SINGLE_FILE_SUFFIXES:
        if model_cfg is None:
            raise PipelineLoadError(
                f"{path}: a single-file checkpoint needs config= (sd15, sd2, sd21-v, flux/flux-dev or a "
                "YAML path) describing its architecture"
            )
        if model_cfg.kind == "flow":
            from t2i.pipelines import flux_folder

            pipe = flux_folder.pipeline_from_single_file(path, model_cfg, dtype)
        else:
            pipe = pipeline_from_single_file(path, model_cfg, dtype)
    else:
        raise PipelineLoadError(
            f"{path}: unknown file type {path.suffix!r}; expected a pipeline folder or one of "
            f"{', '.join(SINGLE_FILE_SUFFIXES)}"
        )
    pipe.freeze()
    return pipe.to(device) if device is not None else pipe


def text_dtype_for(device: str | torch.device | None, dtype: torch.dtype | None) -> torch.dtype:
    """float32 on the CPU (its half-precision kernels are slow and coarse), else the pipeline's dtype."""
    on_cpu = device is None or torch.device(device).type == "cpu"
    return torch.float32 if on_cpu or dtype is None else dtype


def _model_config(config: Any, overrides: list[str] | None) -> Any:
    if isinstance(config, (str, Path)):
        from t2i.config import load_config

        return load_config(config, overrides or []).model
    if overrides:
        raise ConfigError(
            "overrides: only apply to a config name or YAML path; edit the config object instead"
        )
    return as_model_config(config)


def assemble_pipeline(
    model_cfg: Any,
    unet: nn.Module,
    vae: nn.Module,
    text_encoder: nn.Module | None,
    sampler: str = CONFIG_DEFAULT_SAMPLER,
    text_encoder_2: nn.Module | None = None,
) -> LatentPipeline:
    """A frozen pipeline from built modules and their `model:` config, with SD's schedule for `sampler` as its
    scheduler config."""
    model_cfg = as_model_config(model_cfg)
    pipe = LatentPipeline(
        unet,
        vae,
        text_encoder,
        scheduler_config_from_model(model_cfg, sampler),
        model_cfg.scale_factor,
        sampler,
        _config_dict(model_cfg),
        text_encoder_2=text_encoder_2,
    )
    return pipe.freeze()


def pipeline_from_single_file(path: Path, model_cfg: Any, dtype: torch.dtype | None) -> LatentPipeline:
    """The file's modules under `model_cfg`; SD's schedule with DDIM (CompVis' default), or Euler for SDXL (what
    diffusers' SDXL pipelines ship)."""
    parts = load_single_file(path, model_cfg, dtype)
    sampler = "euler" if as_model_config(model_cfg).conditioner_config is not None else CONFIG_DEFAULT_SAMPLER
    return assemble_pipeline(model_cfg, parts["unet"], parts["vae"], parts.get("text_encoder"), sampler,
                             parts.get("text_encoder_2"))  # fmt: skip


def load_folder(
    root: Path,
    model_cfg: Any,
    dtype: torch.dtype | None,
    variant: str | None = None,
    text_dtype: torch.dtype = torch.float32,
) -> LatentPipeline:
    """A diffusers or t2i folder; `model_cfg` (when given) replaces t2i.yaml."""
    from t2i.convert.unet_diffusers import load_unet_from_diffusers
    from t2i.convert.vae_diffusers import load_vae
    from t2i.pipelines import flux_folder
    from t2i.pipelines.sdxl_folder import is_sdxl_folder, load_sdxl_components

    if flux_folder.is_flux_folder(root):
        return flux_folder.load_flux_folder(root, model_cfg, dtype, variant=variant, text_dtype=text_dtype)
    if is_sdxl_folder(root):
        return LatentPipeline(**load_sdxl_components(root, model_cfg, dtype, variant=variant, text_dtype=text_dtype))
    index = read_model_index(root)
    if model_cfg is None and (root / T2I_CONFIG).is_file():
        model_cfg = _model_config(root / T2I_CONFIG, None)
    scheduler_config = read_scheduler_config(root)
    dtype = dtype or torch.float32
    unet = load_unet_from_diffusers(root / "unet", dtype=dtype, variant=variant)
    vae = load_vae(root / "vae", variant=variant).to(dtype).eval()
    scale_factor = vae.scale_factor if vae.scale_factor is not None else 0.18215
    text_encoder = load_folder_text_encoder(root, index, model_cfg, variant=variant, dtype=text_dtype)
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


def load_folder_text_encoder(
    root: Path, index: dict[str, Any], model_cfg: Any, variant: str | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """The text encoder of `root/text_encoder` with the tokenizer of `root/tokenizer`.

    With a t2i.yaml its cond_stage_config gives kind, layer and max_length; otherwise the kind follows the class
    in model_index.json and max_length is the tokenizer's `model_max_length` (what diffusers pads to).
    """
    from t2i.text.encoders import MaskedMeanEncoder, build_clip
    from t2i.text.tokenize import load_hf_model, load_tokenizer, model_options

    class_name = index["text_encoder"][1]
    if model_cfg is not None:
        cond = model_cfg.cond_stage_config
        kind, layer, max_length = cond.kind, str(cond.layer), cond.max_length
    else:
        kind, layer, max_length = TEXT_KIND_OF_CLASS.get(class_name), "last", None
    if kind in ("clip", "openclip"):
        return build_clip(root, None, layer, max_length, variant=variant, dtype=dtype)
    if kind not in ("t5", "minilm"):
        raise PipelineLoadError(
            f"{root / MODEL_INDEX}: text_encoder class {class_name!r} is not supported; "
            f"expected one of {', '.join(TEXT_KIND_OF_CLASS)}"
        )
    import transformers

    tokenizer = load_tokenizer(root / "tokenizer")
    model_class = getattr(transformers, class_name, transformers.AutoModel)
    model = load_hf_model(model_class, root / "text_encoder", f"a {class_name} folder",
                           **model_options(variant, dtype, root / "text_encoder"))
    return MaskedMeanEncoder(
        model,
        tokenizer,
        max_length or tokenizer.model_max_length,
        kind=kind,
        normalize_pooled=kind == "minilm",
    )
