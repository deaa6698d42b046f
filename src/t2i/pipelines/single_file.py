"""Original (CompVis / Stability / NeMo) single-file SD checkpoints -> t2i UNet, VAE and text encoder.

A single file holds every component under one prefix each:
  model.diffusion_model.*      the UNet (CompVis key names, which t2i's UNetModel uses as they are)
  first_stage_model.*          the VAE (CompVis key names)
  cond_stage_model.transformer.*   SD1: a Hugging Face CLIPTextModel
  cond_stage_model.model.*         SD2: an OpenCLIP text tower
NeMo checkpoints nest all of it one level deeper (`model.model.diffusion_model.*`, `model.first_stage_model.*`).
Top-level schedule buffers (`betas`, `alphas_cumprod`, ...) and EMA copies (`model_ema.*`) are ignored.
sgm (SDXL) files hold the text encoders as `conditioner.embedders.{i}.transformer.*` / `.model.*` instead
(`t2i.convert.sgm_keys`), matched in order to the config's text embedders (`model.conditioner_config`).
`t2i.pipelines.single_file_save` writes both layouts.

A single file holds no tokenizer: for SD 1/2 `cond_stage_config.path` names a local folder with it; for SDXL each
text embedder's `emb_model.path`: the tokenizer folder itself, a folder holding `tokenizer/` (first encoder) or
`tokenizer_2/`, or a text-encoder folder of a diffusers SDXL layout (`.../text_encoder_2`, tokenizer beside it in
`.../tokenizer_2`). A `config.json` there (or in `text_encoder[_2]/`) gives the heads and activation the tensors
cannot tell (an OpenCLIP embedder's `arch` does too).

The architecture is not in the file: it comes from a t2i config (`sd15`, `sd2`, `sd21-v` or a YAML path).
A single file carries no tokenizer either, so CLIP/OpenCLIP need `cond_stage_config.path`: a local folder with
the tokenizer (and optionally the text encoder's config.json).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.convert.sgm_keys import SGM_EMBEDDER_PREFIX, embedder_prefix
from t2i.convert.text_keys import strip_prefix
from t2i.errors import ConfigError, PipelineLoadError, WeightsMismatchError
from t2i.models.weights import check_state_keys
from t2i.text.tokenize import TOKENIZER_FILES, load_tokenizer

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
    sgm: dict[str, torch.Tensor] = field(default_factory=dict)  # `conditioner.embedders.*`, keys as in the file


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
        elif key.startswith(SGM_EMBEDDER_PREFIX):
            parts.sgm[key] = value
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
            f"{UNET_PREFIX}*, {VAE_PREFIX}*, {TEXT_PREFIX}* or {SGM_EMBEDDER_PREFIX}*"
        )
    if parts.text and parts.sgm:
        raise WeightsMismatchError(
            f"{source}: both {TEXT_PREFIX}* and {SGM_EMBEDDER_PREFIX}* keys; expected one text-encoder layout"
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


# ------------------------------------------------------------------------------------------- text encoders (SD 1/2)


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


# Widths of the released CLIP text towers, whose heads are 64 wide: OpenAI ViT-L (SD 1), OpenCLIP ViT-H (SD 2),
# OpenCLIP bigG (SDXL). A head count is not in the weights' shapes; for any other width it must come from a config.
STANDARD_CLIP_HEADS = {512: 8, 768: 12, 1024: 16, 1280: 20}


def guessed_clip_heads(width: int, source: str, key: str = "model.cond_stage_config") -> int:
    """The head count of a released CLIP width; PipelineLoadError for any other, whose count cannot be guessed."""
    if width in STANDARD_CLIP_HEADS:
        return STANDARD_CLIP_HEADS[width]
    raise PipelineLoadError(
        f"{source}: text encoder width {width} is no released CLIP, so its attention head count cannot be "
        f"read from the weights; set {key}.path to a folder holding its config.json (e.g. the diffusers "
        f"folder's text_encoder/) or {key}.arch.heads"
    )


def _clip_config_from_shapes(text: dict[str, torch.Tensor], source: str, key: str = "model.cond_stage_config") -> Any:
    """CLIPTextConfig read off an HF CLIP text state dict (a released width's heads, quick-GELU as OpenAI CLIP)."""
    from transformers import CLIPTextConfig

    vocab, width = text["text_model.embeddings.token_embedding.weight"].shape
    layers = {int(k.split(".")[3]) for k in text if k.startswith("text_model.encoder.layers.")}
    return CLIPTextConfig(
        vocab_size=int(vocab),
        hidden_size=int(width),
        num_hidden_layers=len(layers),
        num_attention_heads=guessed_clip_heads(int(width), source, key),
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
    model = CLIPTextModel(_folder_clip_config(cond) or _clip_config_from_shapes(hf_state, source))
    load_strict(
        model,
        fit_text_model_prefix({k: v.float() for k, v in hf_state.items()}, model),
        "text encoder",
        source,
    )
    return CLIPEncoder(model, tokenizer, str(cond.layer), cond.max_length)


def _openclip_arch_guess(cond: Any, width: int, source: str) -> dict[str, Any]:
    """Heads and activation from `cond.path`'s CLIP config when present, else a released width's heads and GELU."""
    folder_config = _folder_clip_config(cond)
    if folder_config is not None:
        return {"width": width, "heads": folder_config.num_attention_heads, "act": folder_config.hidden_act}
    return {"width": width, "heads": guessed_clip_heads(width, source), "act": "gelu"}


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
    arch = cond.arch if cond.arch is not None else _openclip_arch_guess(cond, shapes["width"], source)
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
    """{"unet", "vae", "text_encoder"} from a single-file checkpoint and the `model:` config describing it
    (an sgm SDXL file: "text_encoder" and "text_encoder_2", the refiner "text_encoder_2" alone).

    UNet and VAE weights are cast to `dtype` (float32 when None); the text encoder stays float32.
    """
    from t2i.pipelines.build import as_model_config

    cfg = as_model_config(model_cfg)
    if cfg.kind != "latent_diffusion":
        raise ConfigError(f"model.kind: {cfg.kind!r}; a single-file SD checkpoint needs latent_diffusion")
    source = str(path)
    parts = split_checkpoint(read_checkpoint(path), source)
    dtype = dtype or torch.float32
    modules = {"unet": load_unet(parts, cfg, dtype, source), "vae": load_vae(parts, cfg, dtype, source)}
    if parts.sgm or cfg.conditioner_config is not None:
        return {**modules, **load_sgm_text_encoders(parts.sgm, cfg, source)}
    return {**modules, "text_encoder": load_text_encoder(parts, cfg.cond_stage_config, source)}


# ------------------------------------------------------------------------------------------- text encoders (sgm)

TOWER = re.compile(rf"{re.escape(SGM_EMBEDDER_PREFIX)}(\d+)\.(transformer|model)\.")


def sgm_towers(state: dict[str, torch.Tensor]) -> list[tuple[int, str]]:
    """[(embedder index, "clip" | "openclip")] of the text towers under `conditioner.embedders.*`, in order."""
    found: dict[int, str] = {}
    for key in state:
        match = TOWER.match(key)
        if match:
            found[int(match.group(1))] = "clip" if match.group(2) == "transformer" else "openclip"
    return sorted(found.items())


def load_sgm_text_encoders(state: dict[str, torch.Tensor], model_cfg: Any, source: str) -> dict[str, nn.Module]:
    """{diffusers component name: frozen TextEncoder} for the file's text towers (`state`: its
    `conditioner.embedders.*` tensors), each with its embedder's layer, max_length and tokenizer."""
    from t2i.text.conditioner import text_encoder_names

    positions = [i for i, e in enumerate(model_cfg.embedders()) if e.is_text]
    towers = sgm_towers(state)
    if len(towers) != len(positions):
        raise WeightsMismatchError(
            f"{source}: {len(towers)} text encoders under {SGM_EMBEDDER_PREFIX}* ({towers}); the config has "
            f"{len(positions)} text embedders (model.conditioner_config.emb_models)"
        )
    configs = model_cfg.embedders()
    names = text_encoder_names([configs[i].emb_model.always_return_pooled for i in positions])
    encoders = {}
    for name, position, (index, kind) in zip(names, positions, towers, strict=True):
        key = f"model.conditioner_config.emb_models.{position}.emb_model"
        tower = strip_prefix(state, embedder_prefix(index, kind))
        encoders[name] = _tower_encoder(tower, kind, configs[position].emb_model, key, source, name)
    return encoders


def _tower_encoder(tower: dict[str, torch.Tensor], kind: str, cond: Any, key: str, source: str, name: str) -> Any:
    from transformers import CLIPTextModel

    from t2i.text.encoders import CLIPEncoder, fit_text_model_prefix, openclip_encoder

    tokenizer = load_tokenizer(_tokenizer_folder(cond.path, key, name, source))
    folder_config = _folder_config(cond.path, name)
    if kind == "openclip":
        width = int(tower["token_embedding.weight"].shape[1])
        arch = cond.arch
        if arch is None:  # heads and activation from the folder's config, else a released width's and GELU
            if folder_config is not None:
                arch = {"width": width, "heads": folder_config.num_attention_heads, "act": folder_config.hidden_act}
            else:
                arch = {"width": width, "heads": guessed_clip_heads(width, source, key), "act": "gelu"}
        return openclip_encoder(tower, arch, tokenizer, cond.layer, cond.max_length, source)
    hf_state = {k: v.float() for k, v in tower.items() if not k.endswith("position_ids")}
    model = CLIPTextModel(folder_config or _clip_config_from_shapes(_with_prefix(hf_state), source, key))
    load_strict(model, fit_text_model_prefix(hf_state, model), f"{name} (CLIP)", source)
    return CLIPEncoder(model, tokenizer, cond.layer, cond.max_length)


def _folder_config(path: str | None, name: str) -> Any:
    """The CLIPTextConfig in `path/name/` or `path/`, if there is one."""
    from transformers import CLIPTextConfig

    for folder in (Path(path) / name, Path(path)) if path else ():
        if (folder / "config.json").is_file():
            return CLIPTextConfig.from_pretrained(str(folder), local_files_only=True)
    return None


def _with_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {("text_model." + k.removeprefix("text_model.")): v for k, v in state.items()}


def _tokenizer_folder(path: str | None, key: str, name: str, source: str) -> Path:
    """The tokenizer for component `name` from the embedder's `path` (see the module docstring)."""
    if path is None:
        raise PipelineLoadError(
            f"{source}: a single file has no tokenizer; set {key}.path to a local folder holding {name}'s "
            "tokenizer (e.g. a diffusers SDXL folder)"
        )
    folder = Path(path)
    tokenizer = name.replace("text_encoder", "tokenizer", 1)
    candidates = [folder / tokenizer, folder, folder.parent / folder.name.replace("text_encoder", "tokenizer", 1)]
    for candidate in candidates:
        if any((candidate / f).is_file() for f in TOKENIZER_FILES):
            return candidate
    raise PipelineLoadError(f"{key}.path: {folder} holds no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...)")
