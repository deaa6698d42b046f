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

SDXL: diffusers files add `text_encoder_2.` (its CLIPTextModelWithProjection: `text_encoder_2.text_model.encoder...`);
kohya files name the encoders `lora_te1_` / `lora_te2_` and the UNet by its sgm module paths
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, t2i's own paths), which t2i writes for an SDXL
(ADM) UNet; UNet names in either spelling (diffusers or sgm paths) are read for every SD UNet.

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
    r"^lora_(?P<prefix>unet|te[12]?)_(?P<flat>[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$"
)
KOHYA_PREFIX = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
PREFIXES = ("unet", "text_encoder", "text_encoder_2")
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
    """A module that carries LoRAs, the file prefix of its keys and its module-path translation."""

    prefix: str
    module: nn.Module
    to_file: Callable[[str], str]
    own_paths: bool = False  # the module's own paths name it in files too (sgm paths of the SD UNet)


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
        return Component("unet", unet, lambda path: names.get(path, path), own_paths=True)
    return Component("unet", unet, lambda path: path)


def is_sdxl_unet(module: nn.Module) -> bool:
    """An SD UNet with the ADM input (SDXL's), whose kohya files use sgm module paths."""
    from t2i.models.unet import UNetModel

    return isinstance(module, UNetModel) and module.unet_config.get("num_classes") is not None


def with_projection_path(path: str) -> str:
    """A module path inside diffusers' CLIPTextModelWithProjection (`text_model.` + the text model's path)."""
    return "text_model." + path.removeprefix("text_model.")


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
    to_file = with_projection_path if prefix == "text_encoder_2" else (lambda path: path)
    return Component(prefix, getattr(module, "model", module), to_file)


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
        if component.own_paths:
            index.setdefault(path, path)
        if component.prefix.startswith("text_encoder"):
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
    kohya = {"unet": "unet", "text_encoder": "te", "text_encoder_2": "te2"}.get(prefix, prefix)
    return f"lora_{kohya}_{name}" if flat else f"{prefix}.{name}"


def _listing(what: str, names: list[str]) -> str:
    shown = ", ".join(names[:5])
    more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
    return f"{what}: {shown}{more}"


def match_to_modules(
    pairs: dict[tuple[str, str, bool], LoraPair], components: list[Component], source: str = "LoRA file"
) -> dict[str, dict[str, LoraPair]]:
    """{component prefix: {our module path: LoraPair}}; LoraError naming every key that matches no module."""
    by_prefix = {c.prefix: c for c in components}
    indexes = {c.prefix: file_name_index(c) for c in components}
    flat_indexes = {p: {k.replace(".", "_"): v for k, v in idx.items()} for p, idx in indexes.items()}
    matched: dict[str, dict[str, LoraPair]] = {}
    unmatched = []
    for ident, pair in pairs.items():
        prefix, name, flat = ident
        index = (flat_indexes if flat else indexes).get(prefix, {})
        path = index.get(name)
        if prefix not in by_prefix or path is None:
            unmatched.append(_display(ident))
            continue
        matched.setdefault(prefix, {})[path] = pair
    if unmatched:
        raise LoraError(_listing(f"{source}: LoRA keys that match no module of the model", unmatched))
    return matched


def read_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` LoRA file.

    LoraError for a missing or unreadable file, a file with no tensors (it would change nothing, silently)
    and a tensor holding NaN or infinity (it would turn every image into noise); the message names the key.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file; expected a .safetensors file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraError(f"{path}: not a readable safetensors file ({exc.__class__.__name__})") from None
    if not tensors:
        raise LoraError(f"{path}: holds no tensors; expected LoRA weights (lora_A/lora_B or lora_down/lora_up)")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
            raise LoraError(f"{path}: {key} holds {bad} values; expected finite LoRA weights")
    return tensors


def read_lora_metadata(path: str | Path) -> dict[str, Any]:
    """What t2i recorded in the file header (rank, alpha, targets), or {} for foreign files."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraError(f"{path}: not a readable safetensors file ({exc.__class__.__name__})") from None
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        raise LoraError(f"{path}: its {METADATA_KEY} header entry is not JSON") from None


# ------------------------------------------------------------------------------------------ writing


def lora_state_dict(
    components: list[Component], adapter_name: str = DEFAULT_ADAPTER, naming: str = "peft"
) -> dict[str, torch.Tensor]:
    """The adapter's weights in `peft` (diffusers, alpha folded into lora_B) or `kohya` naming."""
    if naming not in ("peft", "kohya"):
        raise LoraError(f"naming: {naming!r}; expected peft or kohya")
    state: dict[str, torch.Tensor] = {}
    sdxl = any(c.prefix == "text_encoder_2" or (c.prefix == "unet" and is_sdxl_unet(c.module)) for c in components)
    for component in components:
        for path, (down, up, ratio) in lora_weights(component.module, adapter_name).items():
            name = component.to_file(path)
            down, up = down.detach().float().cpu().contiguous(), up.detach().float().cpu()
            if naming == "peft":
                state[f"{component.prefix}.{name}.lora_A.weight"] = down
                state[f"{component.prefix}.{name}.lora_B.weight"] = (up * ratio).contiguous()
            else:
                flat = kohya_module_name(component, path, sdxl)
                state[f"{flat}.lora_down.weight"] = down
                state[f"{flat}.lora_up.weight"] = up.contiguous()
                state[f"{flat}.alpha"] = torch.tensor(ratio * down.shape[0])
    if not state:
        raise LoraError(f"adapter {adapter_name!r}: the model holds no LoRA weights of that name")
    return state


def kohya_module_name(component: Component, path: str, sdxl: bool) -> str:
    """kohya-ss's flat name of module `path`: `lora_unet_` + the diffusers path (SD 1/2) or the sgm path (SDXL);
    `lora_te_` (SD 1/2) or `lora_te1_` / `lora_te2_` (SDXL) + the text model path (`text_model_encoder_...`)."""
    if component.prefix == "unet":
        name = path if sdxl and component.own_paths else component.to_file(path)
        return "lora_unet_" + name.replace(".", "_")
    kohya = {"text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}[component.prefix]
    return f"{kohya}_" + with_projection_path(path).replace(".", "_")


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
