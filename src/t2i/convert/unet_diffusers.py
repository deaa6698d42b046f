"""Convert the SD / SDXL UNet between diffusers `UNet2DConditionModel` and t2i `UNetModel` (CompVis key names).

Both directions are covered for the config (diffusers config.json <-> NeMo/sgm `unet_config`) and the state dict.
The key map is derived from the module tree of a `UNetModel` built on the meta device, so it always matches
the model exactly.

SDXL fields: per-level `transformer_layers_per_block` <-> `transformer_depth` (+ `transformer_depth_middle`),
`addition_embed_type: text_time` with `projection_class_embeddings_input_dim` <-> `num_classes: sequential`
with `adm_in_channels` (`add_embedding.linear_1/2` <-> `label_emb.0.0/0.2`; `add_time_proj` has no weights),
and `norm_num_groups`. `addition_time_embed_dim` (the size-embedding width, 256 for SDXL) belongs to the
conditioning, not to UNetModel: read it with `addition_time_embed_dim(config)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from t2i.errors import ConfigError, PipelineLoadError
from t2i.models.unet import UNetModel
from t2i.models.unet_layout import (
    attention_heads,
    attention_levels,
    level_depths,
    middle_depth,
    resolve_unet_config,
)
from t2i.models.weights import check_state_keys, read_diffusers_weights

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

# diffusers config fields that change the architecture; only these values map onto UNetModel.
REQUIRED_DIFFUSERS_VALUES: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_attention_heads": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}

RESNET_RENAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
TOP_LEVEL_RENAMES = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
}
ADDITION_EMBED_TYPES = (None, "text_time")
SDXL_SIZE_EMBED_DIM = 256


# ----------------------------------------------------------------------------------------------- configs


def _uniform(value: Any, name: str, where: str = "diffusers config") -> Any:
    """A scalar, or the single value of a list whose items are all equal; ConfigError otherwise."""
    if isinstance(value, (list, tuple)):
        if len(set(map(str, value))) != 1:
            raise ConfigError(
                f"{where}.{name}: per-block values {list(value)} are not supported; expected one value"
            )
        return value[0]
    return value


def _check_supported_diffusers_fields(config: dict[str, Any]) -> None:
    for key, expected in REQUIRED_DIFFUSERS_VALUES.items():
        value = config.get(key, expected)
        if isinstance(value, (list, tuple)) and not isinstance(expected, (list, tuple)):
            value = _uniform(value, key)
        if value != expected:
            raise ConfigError(
                f"diffusers config.{key}: {value!r} is not supported by UNetModel; expected {expected!r}"
            )


def _attention_levels(down_types: list[str], up_types: list[str]) -> list[int]:
    """Indices of the levels that carry cross-attention; checks the up blocks mirror the down blocks."""
    levels = []
    for i, kind in enumerate(down_types):
        if kind not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise ConfigError(f"diffusers config.down_block_types[{i}]: unsupported block {kind!r}")
        if kind == "CrossAttnDownBlock2D":
            levels.append(i)
    expected_up = [
        "CrossAttnUpBlock2D" if i in levels else "UpBlock2D" for i in reversed(range(len(down_types)))
    ]
    if list(up_types) != expected_up:
        raise ConfigError(
            f"diffusers config.up_block_types: {list(up_types)} does not mirror down_block_types; "
            f"expected {expected_up}"
        )
    return levels


def _head_settings(channels_and_heads: list[tuple[int, int]]) -> tuple[int, int]:
    """(num_heads, num_head_channels) reproducing diffusers' per-site head counts with openaimodel's rule."""
    heads = {h for _, h in channels_and_heads}
    if len(heads) == 1:
        return heads.pop(), -1
    dims = {c // h for c, h in channels_and_heads}
    if len(dims) == 1 and all(c % h == 0 for c, h in channels_and_heads):
        return -1, dims.pop()
    raise ConfigError(
        f"diffusers config.attention_head_dim: heads per block {channels_and_heads} have neither a "
        "constant head count nor a constant head width"
    )


def _diffusers_depths(config: dict[str, Any], levels: int) -> tuple[list[int], int]:
    """(depth per level, middle depth) from `transformer_layers_per_block` (int or one per level)."""
    value = config.get("transformer_layers_per_block", 1)
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, (list, tuple)) for v in value) or len(value) != levels:
            raise ConfigError(
                f"diffusers config.transformer_layers_per_block: {list(value)} is not supported; "
                f"expected an int or one int per block ({levels})"
            )
        depths = [int(v) for v in value]
    else:
        depths = [int(value)] * levels
    return depths, depths[-1]  # diffusers' mid block takes the last entry


def _t2i_depths(depths: list[int], middle: int, attention: list[int]) -> dict[str, Any]:
    """`transformer_depth` (an int when every transformer has one depth, else per level with 0 where a level
    has no attention) and `transformer_depth_middle` (null when it equals the last level's depth)."""
    used = [depths[i] for i in attention] + [middle]
    if any(d < 1 for d in used):
        raise ConfigError(
            f"diffusers config.transformer_layers_per_block: {depths}; a transformer of depth 0 has no "
            "UNetModel equivalent; expected >= 1 at every CrossAttn block and the mid block"
        )
    if len(set(used)) == 1:
        return {"transformer_depth": used[0], "transformer_depth_middle": None}
    per_level = [d if i in attention else 0 for i, d in enumerate(depths)]
    return {
        "transformer_depth": per_level,
        "transformer_depth_middle": None if middle == per_level[-1] else middle,
    }


def _adm_settings(config: dict[str, Any]) -> dict[str, Any]:
    """`num_classes` / `adm_in_channels` from diffusers' addition embedding (SDXL's `text_time`)."""
    kind = config.get("addition_embed_type")
    if kind not in ADDITION_EMBED_TYPES:
        raise ConfigError(
            f"diffusers config.addition_embed_type: {kind!r} is not supported by UNetModel; "
            f"expected one of {list(ADDITION_EMBED_TYPES)}"
        )
    if kind is None:
        return {"num_classes": None, "adm_in_channels": None}
    adm = config.get("projection_class_embeddings_input_dim")
    if not isinstance(adm, int):
        raise ConfigError(
            f"diffusers config.projection_class_embeddings_input_dim: {adm!r}; expected an int with text_time"
        )
    return {"num_classes": "sequential", "adm_in_channels": adm}


def addition_time_embed_dim(config: dict[str, Any]) -> int | None:
    """The width of each micro-conditioning value's embedding in a diffusers `text_time` UNet config (SDXL:
    256), i.e. the `dim` of `t2i.models.layers.size_embedding`; None without an addition embedding."""
    if config.get("addition_embed_type") != "text_time":
        return None
    return int(config.get("addition_time_embed_dim") or SDXL_SIZE_EMBED_DIM)


def diffusers_to_unet_config(config: dict[str, Any], use_flash_attention: bool = True) -> dict[str, Any]:
    """diffusers UNet2DConditionModel config (config.json dict) -> NeMo/sgm `unet_config` for UNetModel."""
    _check_supported_diffusers_fields(config)
    down_types = list(config.get("down_block_types", ()))
    levels = _attention_levels(down_types, list(config.get("up_block_types", ())))
    block_out = [int(c) for c in config["block_out_channels"]]
    mc = block_out[0]
    if any(c % mc for c in block_out):
        raise ConfigError(f"diffusers config.block_out_channels: {block_out} are not multiples of {mc}")
    head_cfg = config.get("attention_head_dim", 8)
    heads = list(head_cfg) if isinstance(head_cfg, (list, tuple)) else [head_cfg] * len(block_out)
    sites = [(block_out[i], int(heads[i])) for i in levels] + [(block_out[-1], int(heads[-1]))]
    num_heads, num_head_channels = _head_settings(sites)
    depths, middle = _diffusers_depths(config, len(block_out))
    return resolve_unet_config(
        {
            "image_size": config.get("sample_size"),
            "in_channels": int(config.get("in_channels", 4)),
            "out_channels": int(config.get("out_channels", 4)),
            "model_channels": mc,
            "attention_resolutions": [2**i for i in reversed(levels)],
            "num_res_blocks": int(_uniform(config.get("layers_per_block", 2), "layers_per_block")),
            "channel_mult": [c // mc for c in block_out],
            "num_heads": num_heads,
            "num_head_channels": num_head_channels,
            "use_spatial_transformer": True,
            "use_linear_in_transformer": bool(config.get("use_linear_projection", False)),
            **_t2i_depths(depths, middle, levels),
            "context_dim": int(_uniform(config.get("cross_attention_dim", 1280), "cross_attention_dim")),
            **_adm_settings(config),
            "norm_num_groups": int(config.get("norm_num_groups", 32)),
            "use_checkpoint": False,
            "legacy": False,
            "use_flash_attention": use_flash_attention,
            "dropout": float(config.get("dropout", 0.0)),
        }
    )


def _diffusers_layers_per_block(c: dict[str, Any], has_attn: list[bool]) -> int | list[int]:
    """diffusers' `transformer_layers_per_block`: one int when every transformer has one depth, else a list
    whose last entry is the mid block's depth (unused entries of attention-free levels are 1)."""
    depths, middle = level_depths(c), middle_depth(c)
    if middle == 0:
        raise ConfigError(
            "model.unet_config.transformer_depth_middle: 0 (no middle transformer) has no diffusers "
            "equivalent; expected >= 1 for export"
        )
    used = [d for d, a in zip(depths, has_attn, strict=True) if a] + [middle]
    if len(set(used)) == 1:
        return used[0]
    per_level = [d if a else 1 for d, a in zip(depths, has_attn, strict=True)]
    if has_attn[-1] and per_level[-1] != middle:
        raise ConfigError(
            f"model.unet_config.transformer_depth_middle: {middle} differs from the last level's depth "
            f"{per_level[-1]}; diffusers' mid block takes the last level's, so expected {per_level[-1]}"
        )
    per_level[-1] = middle
    return per_level


def _adm_to_diffusers(c: dict[str, Any], size_embed_dim: int) -> dict[str, Any]:
    if c["num_classes"] is None:
        return {"addition_embed_type": None}
    return {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": int(size_embed_dim),
        "projection_class_embeddings_input_dim": int(c["adm_in_channels"]),
    }


def unet_config_to_diffusers(
    unet_config: dict[str, Any], addition_time_embed_dim: int = SDXL_SIZE_EMBED_DIM
) -> dict[str, Any]:
    """NeMo/sgm `unet_config` -> diffusers UNet2DConditionModel config dict (what config.json holds).

    `addition_time_embed_dim` is written for an ADM (SDXL) UNet: the width of each size embedding in y.
    """
    c = resolve_unet_config(unet_config)
    if not c["use_spatial_transformer"]:
        raise ConfigError(
            "model.unet_config.use_spatial_transformer: diffusers export needs true (got false)"
        )
    mc, mults = int(c["model_channels"]), [int(m) for m in c["channel_mult"]]
    has_attn = attention_levels(c)
    heads = []
    for mult in mults:
        h, d = attention_heads(mc * mult, c["num_heads"], c["num_head_channels"], c["legacy"], True)
        if h * d != mc * mult:
            raise ConfigError(
                f"model.unet_config.num_heads: {h} heads x {d} channels != {mc * mult} channels; "
                "diffusers needs heads * head width == channels"
            )
        heads.append(h)
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": c.get("image_size") or 64,
        "in_channels": int(c["in_channels"]),
        "out_channels": int(c["out_channels"]),
        "block_out_channels": [mc * m for m in mults],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "layers_per_block": int(c["num_res_blocks"]),
        "transformer_layers_per_block": _diffusers_layers_per_block(c, has_attn),
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
        "cross_attention_dim": int(c["context_dim"]),
        "use_linear_projection": bool(c["use_linear_in_transformer"]),
        **_adm_to_diffusers(c, addition_time_embed_dim),
        "dropout": float(c["dropout"]),
        "act_fn": "silu",
        "norm_num_groups": int(c["norm_num_groups"]),
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "center_input_sample": False,
    }


# ------------------------------------------------------------------------------------------- state dicts


class _Layout:
    """Where each CompVis block lives in diffusers' down/mid/up structure."""

    def __init__(self, unet_config: dict[str, Any]):
        c = resolve_unet_config(unet_config)
        self.per_level = int(c["num_res_blocks"]) + 1
        self.levels = len(c["channel_mult"])
        self.has_attn = attention_levels(c)

    def input_block(self, index: int, sub: int) -> str:
        level, j = divmod(index - 1, self.per_level)
        if j == self.per_level - 1:
            return f"down_blocks.{level}.downsamplers.0"
        return f"down_blocks.{level}.{'resnets' if sub == 0 else 'attentions'}.{j}"

    def output_block(self, index: int, sub: int) -> str:
        up, j = divmod(index, self.per_level)
        has_attn = self.has_attn[self.levels - 1 - up]
        if sub == 0:
            return f"up_blocks.{up}.resnets.{j}"
        if sub == 1 and has_attn:
            return f"up_blocks.{up}.attentions.{j}"
        return f"up_blocks.{up}.upsamplers.0"


def _rename_resnet_suffix(rest: str) -> str:
    for ours, theirs in RESNET_RENAMES.items():
        if rest == ours or rest.startswith(ours + "."):
            return theirs + rest[len(ours) :]
    raise KeyError(rest)


def t2i_key_to_diffusers(key: str, layout: _Layout) -> str:
    """One CompVis/t2i UNet state-dict key -> its diffusers name."""
    for ours, theirs in TOP_LEVEL_RENAMES.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours) :]
    parts = key.split(".")
    if parts[0] == "middle_block":
        sub, rest = int(parts[1]), ".".join(parts[2:])
        module = {0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}[sub]
    else:
        index, sub, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
        locate = layout.input_block if parts[0] == "input_blocks" else layout.output_block
        module = locate(index, sub)
    if ".resnets." in module:
        rest = _rename_resnet_suffix(rest)
    elif module.endswith("samplers.0"):
        rest = rest.replace("op.", "conv.", 1)
    return f"{module}.{rest}"


def t2i_to_diffusers_key_map(unet_config: dict[str, Any]) -> dict[str, str]:
    """Every t2i state-dict key of the UNet built from `unet_config` -> the diffusers key."""
    with torch.device("meta"):
        model = UNetModel(**unet_config)
    layout = _Layout(unet_config)
    return {key: t2i_key_to_diffusers(key, layout) for key in model.state_dict()}


def _remap(
    state_dict: dict[str, torch.Tensor], key_map: dict[str, str], source: str
) -> dict[str, torch.Tensor]:
    check_state_keys(state_dict, key_map, "UNet", source)
    return {key_map[k]: v for k, v in state_dict.items()}


def diffusers_to_t2i_state_dict(
    state_dict: dict[str, torch.Tensor], unet_config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> t2i UNetModel state dict (same tensors, renamed)."""
    inverse = {theirs: ours for ours, theirs in t2i_to_diffusers_key_map(unet_config).items()}
    return _remap(state_dict, inverse, "diffusers")


def t2i_to_diffusers_state_dict(
    state_dict: dict[str, torch.Tensor], unet_config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """t2i UNetModel state dict -> diffusers UNet2DConditionModel state dict (same tensors, renamed)."""
    return _remap(state_dict, t2i_to_diffusers_key_map(unet_config), "t2i")


# -------------------------------------------------------------------------------------------- folders


def _unet_folder(path: str | Path) -> Path:
    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file() and (folder / "unet" / CONFIG_NAME).is_file():
        folder = folder / "unet"  # a whole diffusers pipeline folder was given
    if not (folder / CONFIG_NAME).is_file():
        raise PipelineLoadError(f"{folder}: no {CONFIG_NAME}; expected a diffusers UNet (or pipeline) folder")
    return folder


def load_unet_from_diffusers(
    path: str | Path, use_flash_attention: bool = True, dtype: torch.dtype | None = None, variant: str | None = None
) -> UNetModel:
    """Build a UNetModel from a diffusers UNet folder: config.json + weights as the hub stores them (safetensors or
    .bin, single or sharded, optionally the `variant` files; `t2i.models.weights.read_diffusers_weights`).

    Weights keep the file's dtype unless `dtype` is given. A pipeline folder's `unet/` is found on its own.
    """
    folder = _unet_folder(path)
    unet_config = diffusers_to_unet_config(
        json.loads((folder / CONFIG_NAME).read_text()), use_flash_attention
    )
    state_dict = diffusers_to_t2i_state_dict(read_diffusers_weights(folder, variant), unet_config)
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    with torch.device("meta"):
        model = UNetModel(**unet_config)
    model.load_state_dict(state_dict, assign=True)
    return model.eval()


def save_unet_as_diffusers(
    model: UNetModel, path: str | Path, addition_time_embed_dim: int = SDXL_SIZE_EMBED_DIM
) -> Path:
    """Write `model` as a diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors).

    `addition_time_embed_dim` goes into config.json for an ADM (SDXL) UNet; see unet_config_to_diffusers."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = unet_config_to_diffusers(model.unet_config, addition_time_embed_dim)
    state_dict = t2i_to_diffusers_state_dict(model.state_dict(), model.unet_config)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, folder / WEIGHTS_NAME)
    return folder
