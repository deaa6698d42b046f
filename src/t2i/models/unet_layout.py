"""What an SD `unet_config` means for the network's layout: resolved keys, checks, and per-level attention.

`UNetModel` and the converters (diffusers, LoRA names) read the layout from here, so a level's attention, depth
and head count are decided in one place. Keys and defaults come from `t2i.config.UNetConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from t2i.config import UNetConfig
from t2i.errors import ConfigError

UNET_CONFIG_KEYS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(UNetConfig) if f.name != "from_pretrained"
)
ADM_KINDS = ("sequential",)


def check_unet_config_keys(config: dict[str, Any]) -> None:
    """Raise ConfigError naming the first key of `config` that UNetModel does not take."""
    for key in config:
        if key not in UNET_CONFIG_KEYS:
            raise ConfigError(
                f"model.unet_config.{key}: unknown key; valid keys: {', '.join(UNET_CONFIG_KEYS)}"
            )


def resolve_unet_config(config: dict[str, Any]) -> dict[str, Any]:
    """Every UNet key: `config` over UNetConfig's defaults, with sequences as plain lists of ints."""
    check_unet_config_keys(config)
    resolved = {**UNetConfig().model_kwargs(), **config}
    for key in ("attention_resolutions", "channel_mult"):
        resolved[key] = [int(v) for v in resolved[key]]
    if isinstance(resolved["transformer_depth"], (list, tuple)):
        resolved["transformer_depth"] = [int(d) for d in resolved["transformer_depth"]]
    return resolved


def level_depths(config: dict[str, Any]) -> list[int]:
    """Transformer depth at each level of a resolved config (an int applies to every level)."""
    depth, levels = config["transformer_depth"], len(config["channel_mult"])
    depths = [int(depth)] * levels if isinstance(depth, int) else list(depth)
    if len(depths) != levels:
        raise ConfigError(
            f"model.unet_config.transformer_depth: {depths} has {len(depths)} entries; "
            f"expected an int or one entry per level of channel_mult ({levels})"
        )
    if any(d < 0 for d in depths):
        raise ConfigError(f"model.unet_config.transformer_depth: {depths}; expected depths >= 0")
    return depths


def middle_depth(config: dict[str, Any]) -> int:
    """The middle block's transformer depth: `transformer_depth_middle`, else the last level's depth."""
    middle = config["transformer_depth_middle"]
    if middle is None:
        return level_depths(config)[-1]
    if int(middle) < 0:
        raise ConfigError(f"model.unet_config.transformer_depth_middle: {middle}; expected null or >= 0")
    return int(middle)


def attention_levels(config: dict[str, Any]) -> list[bool]:
    """Whether each level's blocks carry attention: its downsampling factor 2**level is in
    `attention_resolutions` and, with spatial transformers, its depth is above 0."""
    depths = level_depths(config)
    spatial = config["use_spatial_transformer"]
    return [
        2**level in config["attention_resolutions"] and (depths[level] > 0 or not spatial)
        for level in range(len(config["channel_mult"]))
    ]


def attention_heads(
    channels: int, num_heads: int, num_head_channels: int, legacy: bool, use_spatial_transformer: bool
) -> tuple[int, int]:
    """(heads, dim_head) at a level with `channels` channels, following openaimodel's rule (incl. `legacy`)."""
    if num_head_channels == -1:
        dim_head = channels // num_heads
    else:
        num_heads = channels // num_head_channels
        dim_head = num_head_channels
    if legacy:
        dim_head = channels // num_heads if use_spatial_transformer else num_head_channels
    return num_heads, dim_head


def validate_unet_config(c: dict[str, Any]) -> None:
    """ConfigError naming the first inconsistent key of a resolved config."""
    if c["num_heads"] == -1 and c["num_head_channels"] == -1:
        raise ConfigError("model.unet_config.num_heads: set num_heads or num_head_channels (both are -1)")
    if c["use_spatial_transformer"] and c["context_dim"] is None:
        raise ConfigError("model.unet_config.context_dim: required when use_spatial_transformer is true")
    if c["context_dim"] is not None and not c["use_spatial_transformer"]:
        raise ConfigError("model.unet_config.context_dim: needs use_spatial_transformer: true (got false)")
    if not isinstance(c["num_res_blocks"], int) or c["num_res_blocks"] < 1:
        raise ConfigError(
            f"model.unet_config.num_res_blocks: expected an int >= 1, got {c['num_res_blocks']!r}"
        )
    _validate_groups(c["model_channels"], c["channel_mult"], c["norm_num_groups"])
    _validate_adm(c["num_classes"], c["adm_in_channels"])
    level_depths(c)
    middle_depth(c)
    _validate_attention(c)


def _validate_attention(c: dict[str, Any]) -> None:
    """Every attention resolution names a level, and every attention site's heads tile its channels exactly."""
    factors = [2**level for level in range(len(c["channel_mult"]))]
    wanted = list(c["attention_resolutions"])
    # CompVis ignores entries past the last level, and shared configs rely on that; asking for attention and
    # getting none at all is the mistake worth stopping for.
    if wanted and not any(r in factors for r in wanted):
        raise ConfigError(
            f"model.unet_config.attention_resolutions: {wanted} match no level; expected downsampling factors of "
            f"the levels of channel_mult ({', '.join(map(str, factors))})"
        )
    sites = [level for level, on in enumerate(attention_levels(c)) if on] + [len(c["channel_mult"]) - 1]
    for level in sites:
        channels = c["model_channels"] * c["channel_mult"][level]
        heads, dim_head = attention_heads(channels, c["num_heads"], c["num_head_channels"], c["legacy"],
                                          c["use_spatial_transformer"])  # fmt: skip
        if not c["use_spatial_transformer"]:  # openaimodel's AttentionBlock: `heads` (or channels / head width)
            heads = heads if dim_head == -1 else channels // dim_head
            dim_head = channels // heads if heads > 0 and channels % heads == 0 else 0
        if heads < 1 or dim_head < 1 or heads * dim_head != channels:
            key = "num_head_channels" if c["num_head_channels"] != -1 else "num_heads"
            raise ConfigError(
                f"model.unet_config.{key}: {c[key]} does not divide the {channels} channels of level {level} "
                f"({heads} heads x {dim_head} would be {heads * dim_head} wide); expected a divisor of {channels}"
            )


def _validate_groups(model_channels: int, channel_mult: list[int], groups: Any) -> None:
    if not isinstance(groups, int) or groups < 1:
        raise ConfigError(f"model.unet_config.norm_num_groups: expected an int >= 1, got {groups!r}")
    for mult in channel_mult:
        if (model_channels * mult) % groups:
            raise ConfigError(
                f"model.unet_config.channel_mult: model_channels*mult must be a multiple of norm_num_groups "
                f"({groups}, GroupNorm), got {model_channels}*{mult}"
            )


def _validate_adm(num_classes: Any, adm_in_channels: Any) -> None:
    if num_classes is None:
        if adm_in_channels is not None:
            raise ConfigError("model.unet_config.adm_in_channels: needs num_classes: sequential (got null)")
        return
    if num_classes not in ADM_KINDS:
        raise ConfigError(
            f"model.unet_config.num_classes: {num_classes!r} is not supported; expected null or 'sequential'"
        )
    if not isinstance(adm_in_channels, int) or adm_in_channels < 1:
        raise ConfigError(
            f"model.unet_config.adm_in_channels: expected an int >= 1 with num_classes: sequential, "
            f"got {adm_in_channels!r}"
        )
