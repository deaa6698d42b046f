"""Diffusers AutoencoderKL <-> t2i (CompVis-named) AutoencoderKL: config and state dict, both ways.

Key correspondence (diffusers <-> CompVis):
  encoder.down_blocks.{i}.resnets.{j}          <-> encoder.down.{i}.block.{j}
  encoder.down_blocks.{i}.attentions.{j}       <-> encoder.down.{i}.attn.{j}
  encoder.down_blocks.{i}.downsamplers.0       <-> encoder.down.{i}.downsample
  decoder.up_blocks.{k}.*                      <-> decoder.up.{n-1-k}.*   (diffusers counts from the bottom)
  decoder.up_blocks.{k}.upsamplers.0           <-> decoder.up.{n-1-k}.upsample
  *.mid_block.resnets.0 / attentions.0 / resnets.1 <-> *.mid.block_1 / attn_1 / block_2
  conv_norm_out <-> norm_out;  conv_shortcut <-> nin_shortcut (resnets only)
  attention: group_norm, to_q, to_k, to_v, to_out.0 (Linear, (C, C)) <-> norm, q, k, v, proj_out (1x1 conv, (C, C, 1, 1))
Old diffusers files name attention `query`, `key`, `value`, `proj_attn`; they are read too.

Config names (diffusers <-> ours): latent_channels <-> embed_dim and ddconfig.z_channels, norm_num_groups <->
ddconfig.norm_num_groups, scaling_factor <-> scale_factor, shift_factor <-> shift_factor (FLUX.1: 0.1159),
use_quant_conv / use_post_quant_conv <-> the same names, mid_block_add_attention <-> mid_attention.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from t2i.errors import ConfigError
from t2i.models.autoencoder import (
    AutoencoderKL,
    is_diffusers_vae_config,
    load_state_dict_strict,
    resolve_vae_folder,
)
from t2i.models.weights import read_diffusers_weights

DOWN_PLAIN, DOWN_ATTN = "DownEncoderBlock2D", "AttnDownEncoderBlock2D"
UP_PLAIN, UP_ATTN = "UpDecoderBlock2D", "AttnUpDecoderBlock2D"

OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
ATTENTION_TO_OURS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
ATTENTION_TO_DIFFUSERS = {v: k for k, v in ATTENTION_TO_OURS.items()}


# ---------------------------------------------------------------- config


def base_resolution(config: dict[str, Any]) -> int:
    """diffusers `sample_size` may be an int or an (H, W) pair; CompVis keeps one int."""
    size = config.get("sample_size", 256)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def attn_resolutions_from_blocks(config: dict[str, Any]) -> list[int]:
    """Resolutions whose level has attention, read from down/up block types (which must agree)."""
    n = len(config["block_out_channels"])
    down = list(config.get("down_block_types", [DOWN_PLAIN] * n))
    up = list(config.get("up_block_types", [UP_PLAIN] * n))
    for name, types, allowed in (
        ("down_block_types", down, (DOWN_PLAIN, DOWN_ATTN)),
        ("up_block_types", up, (UP_PLAIN, UP_ATTN)),
    ):
        bad = [t for t in types if t not in allowed]
        if bad or len(types) != n:
            raise ConfigError(f"vae config {name}: {types} not supported; expected {n} of {list(allowed)}")
    down_attn = [t == DOWN_ATTN for t in down]
    up_attn = [t == UP_ATTN for t in reversed(up)]  # diffusers' up blocks run from the lowest resolution
    if down_attn != up_attn:
        raise ConfigError(
            f"vae config: encoder attention levels {down} and decoder {up} must mirror each other"
        )
    res = base_resolution(config)
    return [res // 2**i for i, has_attn in enumerate(down_attn) if has_attn]


def config_from_diffusers(config: dict[str, Any]) -> dict[str, Any]:
    """Map a diffusers AutoencoderKL config.json dict to our {embed_dim, ddconfig, ...} config."""
    if config.get("act_fn", "silu") != "silu":
        raise ConfigError(f"vae config act_fn: {config['act_fn']!r} not supported; expected 'silu'")
    channels = list(config.get("block_out_channels", [64]))
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ConfigError(f"vae config block_out_channels: {channels}; expected multiples of the first entry")
    latent = int(config.get("latent_channels", 4))
    ddconfig = {
        "double_z": True,
        "z_channels": latent,
        "resolution": base_resolution(config),
        "in_channels": int(config.get("in_channels", 3)),
        "out_ch": int(config.get("out_channels", 3)),
        "ch": ch,
        "ch_mult": [c // ch for c in channels],
        "num_res_blocks": int(config.get("layers_per_block", 1)),
        "attn_resolutions": attn_resolutions_from_blocks({**config, "block_out_channels": channels}),
        "dropout": 0.0,
    }
    groups = int(config.get("norm_num_groups", 32))
    if groups != 32:  # absent means 32, as in NeMo/CompVis configs (which have no such key)
        ddconfig["norm_num_groups"] = groups
    shift = config.get("shift_factor")
    return {
        "embed_dim": latent,
        "ddconfig": ddconfig,
        "use_quant_conv": bool(config.get("use_quant_conv", True)),
        "use_post_quant_conv": bool(config.get("use_post_quant_conv", True)),
        "mid_attention": bool(config.get("mid_block_add_attention", True)),
        "scale_factor": float(config.get("scaling_factor", 0.18215)),
        "shift_factor": None if shift is None else float(shift),
    }


def config_to_diffusers(config: dict[str, Any]) -> dict[str, Any]:
    """Map our {embed_dim, ddconfig, ...} config to a diffusers AutoencoderKL config.json dict."""
    dd = config["ddconfig"]
    if config["embed_dim"] != dd["z_channels"]:
        raise ConfigError(
            f"first_stage_config.embed_dim: {config['embed_dim']} must equal ddconfig.z_channels "
            f"({dd['z_channels']}) for the diffusers format"
        )
    if not dd["double_z"]:
        raise ConfigError("first_stage_config.ddconfig.double_z: must be true for the diffusers format")
    levels = len(dd["ch_mult"])
    attn = [dd["resolution"] // 2**i in dd.get("attn_resolutions", []) for i in range(levels)]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": [DOWN_ATTN if a else DOWN_PLAIN for a in attn],
        "up_block_types": [UP_ATTN if a else UP_PLAIN for a in reversed(attn)],
        "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
        "layers_per_block": dd["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": config["embed_dim"],
        "norm_num_groups": dd.get("norm_num_groups", 32),
        "sample_size": dd["resolution"],
        "scaling_factor": config.get("scale_factor") or 0.18215,
        "shift_factor": config.get("shift_factor"),
        "use_quant_conv": config.get("use_quant_conv", True),
        "use_post_quant_conv": config.get("use_post_quant_conv", True),
        "mid_block_add_attention": config.get("mid_attention", True),
    }


# ---------------------------------------------------------------- state dict


def count_up_levels(keys: list[str], pattern: str) -> int:
    """Number of decoder levels, read from the largest index matching `pattern` (one capture group)."""
    indices = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(indices) + 1 if indices else 0


# (diffusers, CompVis) prefixes of the mid block and the encoder's down levels; `#` stands for the level index.
MID_AND_DOWN_NAMES = [
    ("mid_block.resnets.0.", "mid.block_1."),
    ("mid_block.resnets.1.", "mid.block_2."),
    ("mid_block.attentions.0.", "mid.attn_1."),
    ("down_blocks.#.resnets.", "down.#.block."),
    ("down_blocks.#.attentions.", "down.#.attn."),
    ("down_blocks.#.downsamplers.0.", "down.#.downsample."),
]


def rename_mid_and_down(key: str, to_diffusers: bool) -> str:
    """Rename the mid-block and down-level prefixes of one key in either direction."""
    for theirs, ours in MID_AND_DOWN_NAMES:
        source, target = (ours, theirs) if to_diffusers else (theirs, ours)
        pattern = re.escape(source).replace("\\#", r"(\d+)")
        key = re.sub(pattern, target.replace("#", r"\1"), key)
    return key


def key_from_diffusers(key: str, n_up: int) -> str:
    """Rename one diffusers VAE key to its CompVis name (see module docstring)."""
    for old, new in OLD_ATTENTION_NAMES.items():
        key = re.sub(rf"(attentions\.\d+)\.{old}\.", rf"\1.{new}.", key)
    key = rename_mid_and_down(key, to_diffusers=False)
    key = re.sub(r"up_blocks\.(\d+)\.", lambda m: f"up.{n_up - 1 - int(m.group(1))}.", key)
    key = re.sub(r"(up\.\d+)\.resnets\.", r"\1.block.", key)
    key = re.sub(r"(up\.\d+)\.attentions\.", r"\1.attn.", key)
    key = re.sub(r"(up\.\d+)\.upsamplers\.0\.", r"\1.upsample.", key)
    key = key.replace("conv_norm_out.", "norm_out.").replace(".conv_shortcut.", ".nin_shortcut.")
    for theirs, ours in ATTENTION_TO_OURS.items():
        key = re.sub(rf"(attn(?:_1|\.\d+))\.{re.escape(theirs)}\.", rf"\1.{ours}.", key)
    return key


def key_to_diffusers(key: str, n_up: int) -> str:
    """Rename one CompVis VAE key to its diffusers name (inverse of `key_from_diffusers`)."""
    for ours, theirs in ATTENTION_TO_DIFFUSERS.items():
        key = re.sub(rf"(attn(?:_1|\.\d+))\.{ours}\.", rf"\1.{theirs}.", key)
    key = key.replace("norm_out.", "conv_norm_out.").replace(".nin_shortcut.", ".conv_shortcut.")
    key = rename_mid_and_down(key, to_diffusers=True)
    key = re.sub(r"up\.(\d+)\.block\.", r"up.\1.resnets.", key)
    key = re.sub(r"up\.(\d+)\.attn\.", r"up.\1.attentions.", key)
    key = re.sub(r"up\.(\d+)\.upsample\.", r"up.\1.upsamplers.0.", key)
    return re.sub(r"decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{n_up - 1 - int(m.group(1))}.", key)


def is_attention_projection(key: str) -> bool:
    """True for the q/k/v/out weights that are Linear in diffusers and 1x1 conv in CompVis."""
    return bool(re.search(r"attn(?:_1|\.\d+)\.(q|k|v|proj_out)\.weight$", key))


def state_dict_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL weights -> our CompVis-named weights (attention Linear -> 1x1 conv)."""
    n_up = count_up_levels(list(state), r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key_from_diffusers(key, n_up)
        if is_attention_projection(new) and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def state_dict_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our CompVis-named VAE weights -> diffusers AutoencoderKL weights (attention 1x1 conv -> Linear)."""
    n_up = count_up_levels(list(state), r"decoder\.up\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if is_attention_projection(key) and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[key_to_diffusers(key, n_up)] = value
    return out


def load_vae(path: str | Path, variant: str | None = None, **kwargs: Any) -> AutoencoderKL:
    """Load a VAE folder in either format: diffusers (`config.json` + weights as the hub stores them, see
    `t2i.models.weights.read_diffusers_weights`, converted to CompVis names) or t2i's own; a pipeline root holding
    `vae/` works too.

    Extra kwargs (e.g. gradient_checkpointing) override the stored config.
    """
    folder = resolve_vae_folder(Path(path))
    config = json.loads((folder / "config.json").read_text())
    if not is_diffusers_vae_config(config):
        return AutoencoderKL.from_pretrained(folder, **kwargs)
    model = AutoencoderKL.from_config({**config_from_diffusers(config), **kwargs})
    weights = state_dict_from_diffusers(read_diffusers_weights(folder, variant))
    load_state_dict_strict(model, weights, str(folder))
    return model


def save_diffusers_vae(model: Any, path: str) -> None:
    """Write `model` (our AutoencoderKL) as a diffusers `vae/` folder: config.json + diffusion_pytorch_model.safetensors."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_diffusers(model.config_dict()), indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict_to_diffusers(model.state_dict()).items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
