"""Text-encoder key maps: CompVis single-file / OpenCLIP names <-> Hugging Face CLIPTextModel names.

SD1 single files hold the HF model under `cond_stage_model.transformer.` (only the prefix differs).
SD2 single files hold an OpenCLIP text tower under `cond_stage_model.model.`:
  token_embedding.weight                      <-> text_model.embeddings.token_embedding.weight
  positional_embedding (T, D)                 <-> text_model.embeddings.position_embedding.weight
  transformer.resblocks.{i}.ln_1 / ln_2       <-> text_model.encoder.layers.{i}.layer_norm1 / layer_norm2
  transformer.resblocks.{i}.attn.in_proj_*    <-> self_attn.{q,k,v}_proj.* (stacked q;k;v along dim 0)
  transformer.resblocks.{i}.attn.out_proj     <-> self_attn.out_proj
  transformer.resblocks.{i}.mlp.c_fc / c_proj <-> mlp.fc1 / mlp.fc2
  ln_final                                    <-> text_model.final_layer_norm
  text_projection (D, E), used as x @ P       <-> text_projection.weight (E, D) of CLIPTextModelWithProjection
"""

from __future__ import annotations

import re

import torch

SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."

HF_LAYER = "text_model.encoder.layers"
OPENCLIP_BLOCK = "transformer.resblocks"

# OpenCLIP sub-key -> HF sub-key inside one transformer layer (in_proj is handled separately).
LAYER_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
TOP_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# Non-text or non-weight entries of an OpenCLIP checkpoint that the text encoder does not use.
IGNORED_OPENCLIP_KEYS = ("logit_scale", "attn_mask")


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `state` whose key starts with `prefix`, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def add_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def hf_clip_under(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The HF CLIPTextModel held under `prefix` (`{prefix}text_model.*` -> `text_model.*`).

    `position_ids` buffers stored by old transformers versions are dropped.
    """
    text = strip_prefix(state, prefix)
    return {k: v for k, v in text.items() if not k.endswith("position_ids")}


def sd1_text_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD1 single file -> HF CLIPTextModel state dict (`cond_stage_model.transformer.text_model.*` -> `text_model.*`)."""
    return hf_clip_under(state, SD1_TEXT_PREFIX)


def hf_to_sd1_text(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPTextModel state dict -> SD1 single-file text keys."""
    return add_prefix(with_text_model_prefix(state), SD1_TEXT_PREFIX)


def with_text_model_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP text keys in the file-format spelling `text_model.*` (transformers 5's CLIPTextModel drops the
    prefix in its own state dict; `text_projection.*` sits outside it); `position_ids` buffers are dropped."""
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        top = key.startswith(("text_model.", "text_projection."))
        out[key if top else "text_model." + key] = value
    return out


def convert_openclip_layer_key(rest: str, value: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """One OpenCLIP resblock entry (`rest` is the key after `transformer.resblocks.{layer}.`) -> HF entries."""
    prefix = f"{HF_LAYER}.{layer}."
    match = re.fullmatch(r"attn\.in_proj_(weight|bias)", rest)
    if match:
        q, k, v = value.chunk(3, dim=0)
        kind = match.group(1)
        return {f"{prefix}self_attn.{name}_proj.{kind}": t for name, t in zip("qkv", (q, k, v), strict=True)}
    for old, new in LAYER_RENAMES.items():
        if rest.startswith(old + "."):
            return {prefix + new + rest[len(old) :]: value}
    raise KeyError(rest)


def openclip_to_hf(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower keys (under `prefix`) -> HF CLIPTextModelWithProjection keys.

    Keys outside the text tower (`visual.*`, `logit_scale`) are ignored; an unknown text key raises KeyError.
    `text_projection` (D, E) becomes `text_projection.weight` (E, D).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in strip_prefix(state, prefix).items():
        if key.startswith("visual.") or key in IGNORED_OPENCLIP_KEYS:
            continue
        block = re.fullmatch(rf"{OPENCLIP_BLOCK}\.(\d+)\.(.+)", key)
        if block:
            out.update(convert_openclip_layer_key(block.group(2), value, int(block.group(1))))
        elif key in TOP_RENAMES:
            out[TOP_RENAMES[key]] = value
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        else:
            raise KeyError(f"unknown OpenCLIP text key {prefix}{key}")
    return out


def hf_to_openclip(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """HF CLIPTextModel(WithProjection) keys -> OpenCLIP text-tower keys under `prefix` (inverse of openclip_to_hf).

    q/k/v projections are stacked into `in_proj_*`; `position_ids` buffers are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    top_back = {v: k for k, v in TOP_RENAMES.items()}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in with_text_model_prefix(state).items():
        block = re.fullmatch(rf"{re.escape(HF_LAYER)}\.(\d+)\.(.+)", key)
        if block:
            layers.setdefault(int(block.group(1)), {})[block.group(2)] = value
        elif key in top_back:
            out[top_back[key]] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        else:
            raise KeyError(f"unknown HF CLIP text key {key}")
    for index, entries in layers.items():
        out.update(openclip_layer_from_hf(entries, index))
    return add_prefix(out, prefix)


def openclip_layer_from_hf(entries: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """The entries of one HF encoder layer (keys relative to the layer) -> OpenCLIP resblock entries."""
    prefix = f"{OPENCLIP_BLOCK}.{layer}."
    out: dict[str, torch.Tensor] = {}
    for kind in ("weight", "bias"):
        parts = [entries.pop(f"self_attn.{name}_proj.{kind}") for name in "qkv"]
        out[f"{prefix}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    hf_to_old = {new: old for old, new in LAYER_RENAMES.items()}
    for key, value in entries.items():
        module, _, param = key.rpartition(".")
        if module not in hf_to_old:
            raise KeyError(f"unknown HF CLIP layer key {key}")
        out[f"{prefix}{hf_to_old[module]}.{param}"] = value
    return out


def sd2_text_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD2 single file (`cond_stage_model.model.*`, OpenCLIP) -> HF CLIPTextModelWithProjection state dict."""
    return openclip_to_hf(state, SD2_TEXT_PREFIX)


def hf_to_sd2_text(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP text state dict -> SD2 single-file `cond_stage_model.model.*` keys."""
    return hf_to_openclip(state, SD2_TEXT_PREFIX)


def openclip_text_shapes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Read width, layers, context length, vocab size and projection dim off an OpenCLIP text state dict."""
    vocab, width = state["token_embedding.weight"].shape
    layers = {int(m.group(1)) for k in state if (m := re.match(rf"{OPENCLIP_BLOCK}\.(\d+)\.", k))}
    projection = state.get("text_projection")
    return {
        "width": int(width),
        "vocab_size": int(vocab),
        "layers": max(layers) + 1 if layers else 0,
        "context_length": int(state["positional_embedding"].shape[0]),
        "intermediate": int(state[f"{OPENCLIP_BLOCK}.0.mlp.c_fc.weight"].shape[0])
        if layers
        else 4 * int(width),
        "projection_dim": int(projection.shape[1]) if projection is not None else int(width),
    }
