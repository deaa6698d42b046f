"""LoRA files: write the adapter weights alone as `.safetensors`, read the two namings the ecosystem uses.

PEFT / diffusers naming (what `StableDiffusionPipeline.load_lora_weights` reads):
    unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   (r, in)
    unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight   (out, r)
    text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight
A PEFT file without alphas means alpha == rank (diffusers' convention, scale 1), so t2i folds alpha / r into
lora_B when writing. The SD UNet's CompVis module paths are translated to diffusers paths with the UNet key
map of `t2i.convert.unet_diffusers`; Imagen UNets keep their own module paths under `unet.`.

kohya-ss naming (sd-scripts): `lora_unet_<diffusers path with _>.lora_down.weight` (A), `.lora_up.weight`
(B) and `.alpha` (scalar); `lora_te_...` for the text encoder. delta W = alpha / r * up @ down.

Flux transformers (component `transformer`) read diffusers', kohya's and BFL's namings and write diffusers'; their
fused modules make the mapping many-to-one, so `t2i.lora.flux_names` resolves it.

Every key of a file must land on a module: unknown or unmatched keys raise `LoraError` naming them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.errors import LoraError
from t2i.lora.peft_lora import DEFAULT_ADAPTER, lora_weights

PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
PEFT_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")
KOHYA_KEY = re.compile(
    r"^lora_(?P<prefix>unet|te1?)_(?P<flat>[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$"
)
KOHYA_PREFIX = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder"}
PREFIXES = ("unet", "text_encoder", "transformer")
# kohya's `lora_unet_` names the diffusion backbone, whatever the component is called
KOHYA_BACKBONE = ("unet", "transformer")
METADATA_KEY = "t2i_lora"


@dataclass
class LoraPair:
    """One module's low-rank update: down = A (r, in[, 1, 1]), up = B (out, r[, 1, 1]), alpha (None: = r)."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def ratio(self) -> float:
        """alpha / r, the factor in delta W = alpha / r * up @ down."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank


@dataclass
class Component:
    """A module that carries LoRAs, the file prefix of its keys and its module-path translation; `naming`, when
    set, maps file modules to ours many-to-one (`resolve`) and back (`split`) instead (Flux's fused modules)."""

    prefix: str
    module: nn.Module
    to_file: Callable[[str], str]
    naming: Any = None

    @property
    def kohya_label(self) -> str:
        return "unet" if self.prefix in KOHYA_BACKBONE else "te"


# ------------------------------------------------------------------------------------------ naming


def sd_unet_module_names(unet_config: dict[str, Any]) -> dict[str, str]:
    """{t2i module path: diffusers module path} for every weight-bearing module of an SD UNet."""
    from t2i.convert.unet_diffusers import t2i_to_diffusers_key_map

    return {
        ours.removesuffix(".weight"): theirs.removesuffix(".weight")
        for ours, theirs in t2i_to_diffusers_key_map(unet_config).items()
        if ours.endswith(".weight")
    }


def unet_component(unet: nn.Module) -> Component:
    """The `unet.` component: diffusers paths for the SD UNetModel, the model's own paths otherwise (Imagen)."""
    from t2i.models.unet import UNetModel

    if isinstance(unet, UNetModel):
        names = sd_unet_module_names(unet.unet_config)
        return Component("unet", unet, lambda path: names.get(path, path))
    return Component("unet", unet, lambda path: path)


def adapter_slots(target: Any) -> list[dict[str, nn.Module]]:
    """The places a LoRA file can land on: a pipeline's `adapter_slots()` (each slot a {prefix: module} dict; a
    cascade has one per stage), a {prefix: module} dict, or a bare backbone (taken as `unet`)."""
    if isinstance(target, dict):
        return [target]
    if isinstance(target, nn.Module):
        return [{"unet": target}]
    if not hasattr(target, "adapter_slots"):
        raise LoraError(
            f"LoRA target: {type(target).__name__} has no adapter_slots(); expected a pipeline, a dict of "
            "modules or a backbone"
        )
    return list(target.adapter_slots())


def slot_components(slot: dict[str, nn.Module]) -> list[Component]:
    return [_component(prefix, module) for prefix, module in slot.items()]


def components_of(target: Any) -> list[Component]:
    """Every LoRA-carrying component of `target` (see `adapter_slots`), over all its slots."""
    return [component for slot in adapter_slots(target) for component in slot_components(slot)]


def _component(prefix: str, module: nn.Module) -> Component:
    if prefix not in PREFIXES:
        raise LoraError(f"lora component {prefix!r}: unknown; expected one of {', '.join(PREFIXES)}")
    if prefix == "unet":
        return unet_component(module)
    if prefix == "transformer" and hasattr(module, "flux_config"):
        from t2i.lora.flux_names import FluxLoraNaming

        return Component(prefix, module, lambda path: path, FluxLoraNaming(module, LoraPair))
    return Component(prefix, getattr(module, "model", module), lambda path: path)


def _candidate_paths(module: nn.Module) -> list[str]:
    """Paths of the modules a LoRA can sit on (linear/conv), as in the un-adapted model."""
    from t2i.lora.peft_lora import is_adaptable

    paths = []
    for name, child in module.named_modules():
        if not name or ".base_layer" in name or ".lora_" in name:
            continue
        if is_adaptable(child):
            paths.append(name)
    return paths


def file_name_index(component: Component) -> dict[str, str]:
    """{file module path (several spellings): our module path} for one component.

    Text-encoder files written against transformers 4 say `text_model.encoder...`; both spellings resolve.
    """
    index: dict[str, str] = {}
    for path in _candidate_paths(component.module):
        theirs = component.to_file(path)
        index[theirs] = path
        if component.prefix == "text_encoder":
            other = (
                theirs.removeprefix("text_model.")
                if theirs.startswith("text_model.")
                else "text_model." + theirs
            )
            index.setdefault(other, path)
    return index


# ------------------------------------------------------------------------------------------ reading


def parse_lora_state_dict(state: dict[str, torch.Tensor]) -> dict[tuple[str, str, bool], LoraPair]:
    """Group a LoRA state dict by module: {(prefix, name, name_is_kohya_flat): LoraPair}.

    LoraError names the keys that are neither PEFT (`unet.<path>.lora_A.weight`) nor kohya-ss keys.
    """
    from t2i.lora.flux_names import canonical_keys

    state = canonical_keys(state)
    pairs: dict[tuple[str, str, bool], LoraPair] = {}
    unknown = []
    for key, tensor in state.items():
        located = _locate_key(key)
        if located is None:
            unknown.append(key)
            continue
        ident, part = located
        pair = pairs.setdefault(ident, LoraPair())
        if part in ("lora_A", "lora_down.weight"):
            pair.down = tensor
        elif part in ("lora_B", "lora_up.weight"):
            pair.up = tensor
        else:
            pair.alpha = float(tensor.float().reshape(-1)[0])
    if unknown:
        raise LoraError(
            _listing(
                "unknown LoRA keys (expected PEFT `unet.<module>.lora_A.weight` or kohya-ss "
                "`lora_unet_<module>.lora_down.weight` names)",
                unknown,
            )
        )
    incomplete = [_display(i) for i, p in pairs.items() if p.down is None or p.up is None]
    if incomplete:
        raise LoraError(_listing("LoRA modules missing their down/A or up/B weight", incomplete))
    return pairs


def _locate_key(key: str) -> tuple[tuple[str, str, bool], str] | None:
    match = KOHYA_KEY.match(key)
    if match:
        return (KOHYA_PREFIX[match["prefix"]], match["flat"], True), match["part"]
    match = PEFT_KEY.match(key) or PEFT_ALPHA.match(key)
    if match:
        prefix, _, module = match["module"].partition(".")
        if prefix in PREFIXES and module:
            return (prefix, module, False), match.groupdict().get("part") or "alpha"
    return None


def _display(ident: tuple[str, str, bool]) -> str:
    prefix, name, flat = ident
    return f"lora_{'unet' if prefix == 'unet' else 'te'}_{name}" if flat else f"{prefix}.{name}"


def _listing(what: str, names: list[str]) -> str:
    shown = ", ".join(names[:5])
    more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
    return f"{what}: {shown}{more}"


def match_to_modules(
    pairs: dict[tuple[str, str, bool], LoraPair], components: list[Component], source: str = "LoRA file"
) -> dict[str, dict[str, LoraPair]]:
    """{component prefix: {our module path: LoraPair}}; LoraError naming every key that matches no module."""
    by_prefix = {c.prefix: c for c in components}
    for c in components:  # kohya files call the backbone `unet` whatever the component is called
        if c.prefix in KOHYA_BACKBONE:
            by_prefix.setdefault("unet", c)
    indexes = {c.prefix: file_name_index(c) for c in components if c.naming is None}
    flat_indexes = {p: {k.replace(".", "_"): v for k, v in idx.items()} for p, idx in indexes.items()}
    matched: dict[str, dict[str, LoraPair]] = {}
    renamed: dict[str, dict[tuple[str, bool], LoraPair]] = {}
    unmatched = []
    for ident, pair in pairs.items():
        prefix, name, flat = ident
        component = by_prefix.get(prefix)
        if component is not None and component.naming is not None:
            renamed.setdefault(component.prefix, {})[(name, flat)] = pair
            continue
        path = None if component is None else (flat_indexes if flat else indexes)[component.prefix].get(name)
        if path is None:
            unmatched.append(_display(ident))
            continue
        matched.setdefault(component.prefix, {})[path] = pair
    if unmatched:
        raise LoraError(_listing(f"{source}: LoRA keys that match no module of the model", unmatched))
    for prefix, file_pairs in renamed.items():
        matched[prefix] = by_prefix[prefix].naming.resolve(file_pairs, source)
    return matched


def read_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` LoRA file; LoraError for a missing or unreadable file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file; expected a .safetensors file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraError(f"{path}: not a readable safetensors file ({exc.__class__.__name__})") from None


def read_lora_metadata(path: str | Path) -> dict[str, Any]:
    """What t2i recorded in the file header (rank, alpha, targets), or {} for foreign files."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


# ------------------------------------------------------------------------------------------ writing


def lora_state_dict(
    components: list[Component], adapter_name: str = DEFAULT_ADAPTER, naming: str = "peft"
) -> dict[str, torch.Tensor]:
    """The adapter's weights in `peft` (diffusers, alpha folded into lora_B) or `kohya` naming."""
    if naming not in ("peft", "kohya"):
        raise LoraError(f"naming: {naming!r}; expected peft or kohya")
    state: dict[str, torch.Tensor] = {}
    for component in components:
        for path, (down, up, ratio) in lora_weights(component.module, adapter_name).items():
            name = component.to_file(path)
            down, up = down.detach().float().cpu().contiguous(), up.detach().float().cpu()
            if naming == "peft" and component.naming is not None:
                for part, part_down, part_up in component.naming.split(path, down, up * ratio):
                    state[f"{component.prefix}.{part}.lora_A.weight"] = part_down.clone()
                    state[f"{component.prefix}.{part}.lora_B.weight"] = part_up.contiguous()
            elif naming == "peft":
                state[f"{component.prefix}.{name}.lora_A.weight"] = down
                state[f"{component.prefix}.{name}.lora_B.weight"] = (up * ratio).contiguous()
            else:
                flat = f"lora_{component.kohya_label}_{name.replace('.', '_')}"
                state[f"{flat}.lora_down.weight"] = down
                state[f"{flat}.lora_up.weight"] = up.contiguous()
                state[f"{flat}.alpha"] = torch.tensor(ratio * down.shape[0])
    if not state:
        raise LoraError(f"adapter {adapter_name!r}: the model holds no LoRA weights of that name")
    return state


def save_lora_file(
    target: Any,
    path: str | Path,
    adapter_name: str = DEFAULT_ADAPTER,
    naming: str = "peft",
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write adapter `adapter_name` of `target` (pipeline, {prefix: module} or backbone) as safetensors."""
    from safetensors.torch import save_file

    state = lora_state_dict(components_of(target), adapter_name, naming)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt", METADATA_KEY: json.dumps({"naming": naming, **(metadata or {})})}
    partial = path.with_name(path.name + ".partial")  # a crash mid-write never leaves a truncated LoRA
    save_file(state, str(partial), metadata=header)
    os.replace(partial, path)
    return path
