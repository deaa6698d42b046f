"""diffusers' `lora_adapter_metadata` header: each component's peft config, stored beside its LoRA weights.

diffusers' training scripts write it through `save_lora_weights(..., unet_lora_adapter_metadata=
config.to_dict())`: JSON under the safetensors header key `lora_adapter_metadata`, every peft config key prefixed
by its component, e.g. {"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {"attn2.to_k": 2},
"unet.alpha_pattern": {"to_v": 2.0}, "unet.use_rslora": false, "unet.use_dora": false, ...}. diffusers then
builds `LoraConfig(**config)`; without the header it takes alpha = r. So a module's factor is

    alpha / r   (alpha / sqrt(r) with use_rslora)

with r and alpha from the first `rank_pattern` / `alpha_pattern` key that matches the module's name as peft
matches them (the key a regular expression for the whole name or a suffix after a dot), else `r` /
`lora_alpha` (peft's defaults 8 and 8 when absent; LoHa/LoKr configs say `alpha`).

t2i writes the header too: alpha is already folded into lora_B, so it records lora_alpha = r per module
(scale 1), the ranks, the targets and whether DoRA magnitudes are present.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from t2i.errors import LoraError
from t2i.lora.adapters import AdapterWeights, LoraPair

HEADER_KEY = "lora_adapter_metadata"
PEFT_DEFAULT_RANK = 8
PEFT_DEFAULT_ALPHA = 8


def read_adapter_metadata(path: str | Path) -> dict[str, dict[str, Any]]:
    """{component prefix: its peft config} from the file header; {} when the file has none."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(HEADER_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoraError(f"{path}: header {HEADER_KEY} is not JSON ({exc.msg})") from None
    if not isinstance(flat, dict):
        raise LoraError(f"{path}: header {HEADER_KEY} is not a JSON object")
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        prefix, sep, field = key.partition(".")
        if sep:
            configs.setdefault(prefix, {})[field] = value
    return configs


def pattern_value(patterns: dict[str, Any] | None, name: str, default: Any) -> Any:
    """peft's lookup: the value of the first pattern key that matches `name` (whole, or a suffix after a dot)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def module_factor(config: dict[str, Any], name: str) -> tuple[int, float]:
    """(r, alpha / r) that peft gives module `name` under `config` (alpha / sqrt(r) with use_rslora)."""
    rank = int(pattern_value(config.get("rank_pattern"), name, config.get("r", PEFT_DEFAULT_RANK)))
    default_alpha = config.get("lora_alpha", config.get("alpha", PEFT_DEFAULT_ALPHA))
    alpha = float(pattern_value(config.get("alpha_pattern"), name, default_alpha))
    return rank, alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def apply_adapter_metadata(
    adapters: dict[tuple[str, str, bool], AdapterWeights], configs: dict[str, dict[str, Any]], source: str
) -> None:
    """Set each PEFT-named module's factor from its component's config (modules with an `.alpha` key keep it).

    A LoRA whose weights have another rank than the config gives it is an error, as it is in diffusers."""
    for (prefix, name, flat), adapter in adapters.items():
        config = configs.get(prefix)
        if flat or config is None or adapter.alpha is not None:
            continue
        rank, factor = module_factor(config, name)
        if isinstance(adapter, LoraPair) and adapter.rank != rank:
            raise LoraError(
                f"{source}: {prefix}.{name} has rank {adapter.rank} but its {HEADER_KEY} says r={rank}"
            )
        adapter.factor = factor


def adapter_metadata(modules: dict[str, dict[str, AdapterWeights]]) -> dict[str, Any]:
    """The header diffusers reads for LoRAs written with alpha folded into lora_B: {prefix.key: value} with, per
    component, r (the commonest rank), lora_alpha = r, rank_pattern = alpha_pattern = the other modules' ranks,
    target_modules and use_dora."""
    header: dict[str, Any] = {}
    for prefix, by_name in modules.items():
        ranks = {name: a.rank for name, a in by_name.items() if isinstance(a, LoraPair)}
        if not ranks:
            continue
        common = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {name: r for name, r in ranks.items() if r != common}
        dora = any(by_name[name].decomposition() is not None for name in ranks)
        config = {"peft_type": "LORA", "r": common, "lora_alpha": common, "rank_pattern": pattern,
                  "alpha_pattern": dict(pattern), "target_modules": sorted(ranks), "use_dora": dora,
                  "use_rslora": False}  # fmt: skip
        header.update({f"{prefix}.{key}": value for key, value in config.items()})
    return header
