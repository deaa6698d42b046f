"""Original (CompVis / Stability / NeMo) single-file SD checkpoints -> t2i UNet, VAE and text encoder.

A single file holds every component under one prefix each:
  model.diffusion_model.*      the UNet (CompVis key names, which t2i's UNetModel uses as they are)
  first_stage_model.*          the VAE (CompVis key names)
  cond_stage_model.transformer.*   SD1: a Hugging Face CLIPTextModel
  cond_stage_model.model.*         SD2: an OpenCLIP text tower
NeMo checkpoints nest all of it one level deeper (`model.model.diffusion_model.*`, `model.first_stage_model.*`).
Top-level schedule buffers (`betas`, `alphas_cumprod`, ...) and EMA copies (`model_ema.*`) are ignored.

The architecture is not in the file: it comes from a t2i config (`sd15`, `sd2`, `sd21-v` or a YAML path).
A single file carries no tokenizer either, so CLIP/OpenCLIP need `cond_stage_config.path`: a local folder with
the tokenizer (and optionally the text encoder's config.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.errors import ConfigError, PipelineLoadError, WeightsMismatchError
from t2i.models.weights import check_state_keys

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
NEMO_PREFIX = "model."
IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.")


@dataclass
class SingleFileParts:
    """A checkpoint split by component; each dict has its component prefix removed."""

    unet: dict[str, torch.Tensor] = field(default_factory=dict)
    vae: dict[str, torch.Tensor] = field(default_factory=dict)
    text: dict[str, torch.Tensor] = field(default_factory=dict)  # keys keep `transformer.` / `model.`


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or of a .ckpt/.pt read with `torch.load(weights_only=True)`.

    A Lightning-style `{"state_dict": {...}}` wrapper is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineLoadError(f"{path}: no such file; expected a .safetensors or .ckpt checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for a corrupt header
            raise PipelineLoadError(
                f"{path}: not a readable safetensors file ({exc.__class__.__name__})"
            ) from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for pickled code or bad files
        raise PipelineLoadError(
            f"{path}: cannot read checkpoint with weights_only=True ({exc.__class__.__name__}); expected tensors only"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PipelineLoadError(
            f"{path}: checkpoint holds a {type(state).__name__}; expected a dict of tensors"
        )
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _strip_nemo_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NeMo nests the CompVis names under one more `model.`; remove it when the UNet sits there."""
    if not any(k.startswith(NEMO_PREFIX + UNET_PREFIX) for k in state):
        return state
    return {(k.removeprefix(NEMO_PREFIX)): v for k, v in state.items()}


def split_checkpoint(state: dict[str, torch.Tensor], source: str) -> SingleFileParts:
    """Sort the keys of a single file into UNet / VAE / text parts; WeightsMismatchError for foreign keys."""
    state = _strip_nemo_prefix(state)
    parts = SingleFileParts()
    foreign = []
    for key, value in state.items():
        if key.startswith(UNET_PREFIX):
            parts.unet[key[len(UNET_PREFIX) :]] = value
        elif key.startswith(IGNORED_PREFIXES) or "." not in key:
            continue  # EMA copies, the VAE's training loss, schedule buffers (betas, alphas_cumprod, ...)
        elif key.startswith(VAE_PREFIX):
            parts.vae[key[len(VAE_PREFIX) :]] = value
        elif key.startswith(TEXT_PREFIX):
            parts.text[key[len(TEXT_PREFIX) :]] = value
        else:
            foreign.append(key)
    if not parts.unet:
        raise WeightsMismatchError(
            f"{source}: no UNet weights; expected keys under {UNET_PREFIX!r} (or NeMo's 'model.{UNET_PREFIX}'), "
            f"found {list(state)[:3]}"
        )
    if foreign:
        raise WeightsMismatchError(
            f"{source}: unexpected keys {foreign[:3]} ({len(foreign)} total); expected "
            f"{UNET_PREFIX}*, {VAE_PREFIX}*, {TEXT_PREFIX}*"
        )
    return parts


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str, source: str) -> None:
    """Assign `state` to `module` (built on meta or CPU); WeightsMismatchError naming the first bad keys."""
    expected = module.state_dict()
    check_state_keys(state, expected, what, source)
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise WeightsMismatchError(
            f"{source}: {what} weight {k} has shape {tuple(state[k].shape)}; the config "
            f"expects {tuple(expected[k].shape)}"
        )
    module.load_state_dict(state, assign=True)


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}


def load_unet(parts: SingleFileParts, model_cfg: Any, dtype: torch.dtype, source: str) -> nn.Module:
    from t2i.pipelines.build import build_unet

    unet = build_unet(model_cfg, device="meta")
    load_strict(unet, _cast(parts.unet, dtype), "UNet", source)
    return unet.eval()


def _vae_conv_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VAE attention projections saved as Linear (C, C) by diffusers-converted files -> 1x1 conv (C, C, 1, 1)."""
    from t2i.convert.vae_diffusers import is_attention_projection

    return {
        k: (v[:, :, None, None] if v.ndim == 2 and is_attention_projection(k) else v)
        for k, v in state.items()
    }


def load_vae(parts: SingleFileParts, model_cfg: Any, dtype: torch.dtype, source: str) -> nn.Module:
    from t2i.pipelines.build import build_vae

    if not parts.vae:
        raise WeightsMismatchError(f"{source}: no VAE weights; expected keys under {VAE_PREFIX!r}")
    vae = build_vae(model_cfg, device="meta")
    load_strict(vae, _cast(_vae_conv_attention(parts.vae), dtype), "VAE", source)
    return vae.eval()


# ------------------------------------------------------------------------------------------- text encoder


def load_text_encoder(parts: SingleFileParts, cond: Any, source: str) -> nn.Module:
    """The frozen text encoder: from the file's `cond_stage_model.*` weights when present, else from `cond.path`."""
    if not parts.text:
        from t2i.text.encoders import build_text_encoder

        return build_text_encoder(
            cond.kind,
            cond.path,
            layer=cond.layer,
            max_length=cond.max_length,
            arch=cond.arch,
            version=cond.version,
        )
    if any(k.startswith("transformer.") for k in parts.text):
        return _sd1_clip(parts.text, cond, source)
    if any(k.startswith("model.") for k in parts.text):
        return _sd2_openclip(parts.text, cond, source)
    raise WeightsMismatchError(
        f"{source}: unexpected text keys {['cond_stage_model.' + k for k in parts.text][:3]}; "
        f"expected {SD1_TEXT_PREFIX}* (SD1) or {SD2_TEXT_PREFIX}* (SD2)"
    )


def _tokenizer(cond: Any, source: str) -> Any:
    from t2i.text.tokenize import load_tokenizer, tokenizer_folder

    if cond.path is None:
        raise PipelineLoadError(
            f"{source}: a single file has no tokenizer; set model.cond_stage_config.path to a local folder "
            "holding the CLIP tokenizer (e.g. a diffusers SD folder or its tokenizer/)"
        )
    return load_tokenizer(tokenizer_folder(cond.path, None))


def _clip_config_from_shapes(text: dict[str, torch.Tensor]) -> Any:
    """CLIPTextConfig read off an HF CLIP text state dict (64-wide heads, quick-GELU as OpenAI CLIP)."""
    from transformers import CLIPTextConfig

    vocab, width = text["text_model.embeddings.token_embedding.weight"].shape
    layers = {int(k.split(".")[3]) for k in text if k.startswith("text_model.encoder.layers.")}
    return CLIPTextConfig(
        vocab_size=int(vocab),
        hidden_size=int(width),
        num_hidden_layers=len(layers),
        num_attention_heads=max(1, int(width) // 64),
        intermediate_size=int(text["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        max_position_embeddings=int(text["text_model.embeddings.position_embedding.weight"].shape[0]),
    )


def _folder_clip_config(cond: Any) -> Any | None:
    """The CLIPTextConfig in `cond.path` (or its text_encoder/), if there is one."""
    from transformers import CLIPTextConfig

    for folder in (Path(cond.path) / "text_encoder", Path(cond.path)) if cond.path else ():
        if (folder / "config.json").is_file():
            return CLIPTextConfig.from_pretrained(str(folder), local_files_only=True)
    return None


def _sd1_clip(text: dict[str, torch.Tensor], cond: Any, source: str) -> nn.Module:
    from transformers import CLIPTextModel

    from t2i.convert.text_keys import sd1_text_to_hf
    from t2i.text.encoders import CLIPEncoder, fit_text_model_prefix

    if cond.kind != "clip":
        raise ConfigError(
            f"model.cond_stage_config.kind: {cond.kind!r}, but {source} holds an SD1 CLIP text "
            "encoder; expected clip"
        )
    hf_state = sd1_text_to_hf({TEXT_PREFIX + k: v for k, v in text.items()})
    tokenizer = _tokenizer(cond, source)
    # Built on the CPU: its position_ids buffer is not in the file.
    model = CLIPTextModel(_folder_clip_config(cond) or _clip_config_from_shapes(hf_state))
    load_strict(
        model,
        fit_text_model_prefix({k: v.float() for k, v in hf_state.items()}, model),
        "text encoder",
        source,
    )
    return CLIPEncoder(model, tokenizer, str(cond.layer), cond.max_length)


def _openclip_arch_guess(cond: Any, width: int) -> dict[str, Any]:
    """Heads and activation from `cond.path`'s CLIP config when present, else 64-wide heads and GELU."""
    folder_config = _folder_clip_config(cond)
    if folder_config is not None:
        return {"width": width, "heads": folder_config.num_attention_heads, "act": folder_config.hidden_act}
    return {"width": width, "heads": max(1, width // 64), "act": "gelu"}


def _sd2_openclip(text: dict[str, torch.Tensor], cond: Any, source: str) -> nn.Module:
    from transformers import CLIPTextModel

    from t2i.convert.text_keys import openclip_text_shapes, openclip_to_hf
    from t2i.text.encoders import (
        CLIPEncoder,
        fit_text_model_prefix,
        openclip_hf_config,
        resolve_openclip_arch,
    )

    if cond.kind not in ("openclip", "clip"):
        raise ConfigError(
            f"model.cond_stage_config.kind: {cond.kind!r}, but {source} holds an SD2 OpenCLIP text "
            "encoder; expected openclip"
        )
    tower = {k[len("model.") :]: v.float() for k, v in text.items() if not k.startswith("model.visual.")}
    shapes = openclip_text_shapes(tower)
    arch = cond.arch if cond.arch is not None else _openclip_arch_guess(cond, shapes["width"])
    config = openclip_hf_config(resolve_openclip_arch(arch, shapes), shapes)
    try:
        hf_state = openclip_to_hf(tower)
    except KeyError as exc:
        raise WeightsMismatchError(f"{source}: {exc.args[0]}; expected an OpenCLIP text tower") from None
    projection = None
    if "text_projection.weight" in hf_state:
        projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        projection.weight.data.copy_(hf_state.pop("text_projection.weight"))
    model = CLIPTextModel(config)
    load_strict(model, fit_text_model_prefix(hf_state, model), "text encoder", source)
    return CLIPEncoder(
        model, _tokenizer(cond, source), str(cond.layer), cond.max_length, projection, kind="openclip"
    )


def load_single_file(
    path: str | Path, model_cfg: Any, dtype: torch.dtype | None = None
) -> dict[str, nn.Module]:
    """{"unet", "vae", "text_encoder"} from a single-file checkpoint and the `model:` config describing it.

    UNet and VAE weights are cast to `dtype` (float32 when None); the text encoder stays float32.
    """
    from t2i.pipelines.build import as_model_config

    cfg = as_model_config(model_cfg)
    if cfg.kind != "latent_diffusion":
        raise ConfigError(f"model.kind: {cfg.kind!r}; a single-file SD checkpoint needs latent_diffusion")
    source = str(path)
    parts = split_checkpoint(read_checkpoint(path), source)
    dtype = dtype or torch.float32
    return {
        "unet": load_unet(parts, cfg, dtype, source),
        "vae": load_vae(parts, cfg, dtype, source),
        "text_encoder": load_text_encoder(parts, cfg.cond_stage_config, source),
    }
