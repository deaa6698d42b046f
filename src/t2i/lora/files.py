"""LoRA files: write the adapter weights alone as `.safetensors`, read the namings the ecosystem uses.

PEFT / diffusers naming (what `StableDiffusionPipeline.load_lora_weights` reads):
    unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   (r, in)
    unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight   (out, r)
    text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight
diffusers' own training scripts spell A and B `.lora.down.weight` / `.lora.up.weight` (text encoder:
`.lora_linear_layer.down.weight` / `.up.weight`); DoRA adds
`.lora_magnitude_vector` (one value per output row). Alpha is in the `lora_adapter_metadata` header when
diffusers wrote one (`t2i.lora.metadata`: r, lora_alpha, rank_pattern, alpha_pattern, use_rslora), else alpha =
rank (scale 1). t2i folds alpha / r into lora_B when writing and records the header. The SD UNet's CompVis module
paths are translated to diffusers paths with the UNet key map of `t2i.convert.unet_diffusers`; Imagen UNets keep
their own module paths under `unet.`.

kohya-ss / LyCORIS naming (sd-scripts, what A1111 and ComfyUI read): `lora_unet_<diffusers path with _>.<part>`,
`lora_te_...` for the text encoder, with the parts
    LoRA / LoCon  lora_down.weight (A), lora_up.weight (B) (+ lora_mid.weight: LyCORIS' Tucker core)
    LoHa          hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b (+ hada_t1, hada_t2: Tucker cores of k x k convs)
    LoKr          lokr_w1 or lokr_w1_a/_b, lokr_w2 or lokr_w2_a/_b (+ lokr_t2)
    any           alpha (scalar; 0 or absent means alpha = r), dora_scale (LyCORIS' DoRA)
`t2i.lora.adapters` has each kind's update. t2i writes LoHa and LoKr in this naming.

SDXL: diffusers files add `text_encoder_2.` (its CLIPTextModelWithProjection: `text_encoder_2.text_model.encoder...`);
kohya files name the encoders `lora_te1_` / `lora_te2_` and the UNet by its sgm module paths
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, t2i's own paths), which t2i writes for an SDXL
(ADM) UNet; UNet names in either spelling (diffusers or sgm paths) are read for every SD UNet.

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
from t2i.lora.adapters import AdapterWeights, LohaWeights, LokrWeights, LoraPair, build_adapter
from t2i.lora.metadata import HEADER_KEY, adapter_metadata, apply_adapter_metadata
from t2i.lora.peft_lora import DEFAULT_ADAPTER, dora_magnitude, lora_layers, lora_weights

__all__ = ["LoraPair", "parse_lora_state_dict", "save_lora_file"]

KOHYA_KEY = re.compile(r"^lora_(?P<prefix>unet|te[12]?)_(?P<flat>[A-Za-z0-9_]+)\.(?P<part>[A-Za-z0-9_.]+)$")
KOHYA_PREFIX = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
PREFIXES = ("unet", "text_encoder", "text_encoder_2", "transformer")
# kohya's `lora_unet_` names the diffusion backbone, whatever the component is called
KOHYA_BACKBONE = ("unet", "transformer")
METADATA_KEY = "t2i_lora"
# file suffix -> canonical part (the field names of t2i.lora.adapters), per naming
LYCORIS_PARTS = {part: part for part in LohaWeights.MATRICES + LokrWeights.MATRICES}
PEFT_PARTS = {
    "lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    "lora_magnitude_vector": "magnitude", "lora_magnitude_vector.weight": "magnitude", "alpha": "alpha",
    **LYCORIS_PARTS,
}  # fmt: skip
KOHYA_PARTS = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
    "dora_scale": "dora_scale", **LYCORIS_PARTS,
}  # fmt: skip
# longest first, so that `lora_magnitude_vector.weight` wins over shorter endings
PEFT_SUFFIXES = sorted(PEFT_PARTS, key=len, reverse=True)


@dataclass
class Component:
    """A module that carries LoRAs, the file prefix of its keys and its module-path translation; `naming`, when
    set, maps file modules to ours many-to-one (`resolve`) and back (`split`) instead (Flux's fused modules)."""

    prefix: str
    module: nn.Module
    to_file: Callable[[str], str]
    own_paths: bool = False  # the module's own paths name it in files too (sgm paths of the SD UNet)
    naming: Any = None  # a many-to-one file naming (Flux's fused modules: t2i.lora.flux_names)


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
    if prefix == "transformer" and hasattr(module, "flux_config"):
        from t2i.lora.flux_names import FluxLoraNaming

        return Component(prefix, module, lambda path: path, naming=FluxLoraNaming(module))
    to_file = with_projection_path if prefix == "text_encoder_2" else (lambda path: path)
    return Component(prefix, getattr(module, "model", module), to_file)


def _candidate_paths(module: nn.Module) -> list[str]:
    """Paths of the modules a LoRA can sit on (linear/conv), as in the un-adapted model."""
    from t2i.lora.peft_lora import is_adaptable, is_adapter_internal

    paths = []
    for name, child in module.named_modules():
        if not name or is_adapter_internal(name):
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


def parse_lora_state_dict(
    state: dict[str, torch.Tensor], metadata: dict[str, dict[str, Any]] | None = None, source: str = "LoRA file"
) -> dict[tuple[str, str, bool], AdapterWeights]:
    """Group a LoRA state dict by module: {(prefix, name, name_is_kohya_flat): LoraPair | LohaWeights |
    LokrWeights}; `metadata` is the file's `lora_adapter_metadata` by component (`read_adapter_metadata`).

    LoraError names the keys that are neither PEFT/diffusers (`unet.<path>.lora_A.weight`) nor kohya/LyCORIS
    keys, and the modules whose weights are incomplete.
    """
    from t2i.lora.flux_names import canonical_keys

    grouped: dict[tuple[str, str, bool], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in canonical_keys(state).items():
        located = _locate_key(key)
        if located is None:
            unknown.append(key)
            continue
        ident, part = located
        grouped.setdefault(ident, {})[part] = tensor
    if unknown:
        raise LoraError(
            _listing(
                "unknown LoRA keys (expected PEFT `unet.<module>.lora_A.weight` or kohya/LyCORIS "
                "`lora_unet_<module>.lora_down.weight` / `.hada_w1_a` / `.lokr_w1` names)",
                unknown,
            )
        )
    adapters, broken = {}, []
    for ident, parts in grouped.items():
        try:
            adapters[ident] = build_adapter(parts, _display(ident))
        except LoraError as err:
            broken.append(str(err))
        else:
            if ident[2] and adapters[ident].alpha == 0:  # kohya and LyCORIS read alpha 0 as alpha = r
                adapters[ident].alpha = None
    if broken:
        raise LoraError(_listing(f"{source}: incomplete adapter weights", broken))
    apply_adapter_metadata(adapters, metadata or {}, source)
    return adapters


def _locate_key(key: str) -> tuple[tuple[str, str, bool], str] | None:
    match = KOHYA_KEY.match(key)
    if match and match["part"] in KOHYA_PARTS:
        return (KOHYA_PREFIX[match["prefix"]], match["flat"], True), KOHYA_PARTS[match["part"]]
    for suffix in PEFT_SUFFIXES:
        if key.endswith("." + suffix):
            prefix, _, module = key[: -len(suffix) - 1].partition(".")
            if prefix in PREFIXES and module:
                return (prefix, module, False), PEFT_PARTS[suffix]
            return None
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
    pairs: dict[tuple[str, str, bool], AdapterWeights], components: list[Component], source: str = "LoRA file"
) -> dict[str, dict[str, AdapterWeights]]:
    """{component prefix: {our module path: adapter weights}}; LoraError naming every key that matches no
    module."""
    by_prefix = {c.prefix: c for c in components}
    for c in components:  # kohya files call the backbone `unet` whatever the component is called
        if c.prefix in KOHYA_BACKBONE:
            by_prefix.setdefault("unet", c)
    indexes = {c.prefix: file_name_index(c) for c in components if c.naming is None}
    flat_indexes = {p: {k.replace(".", "_"): v for k, v in idx.items()} for p, idx in indexes.items()}
    matched: dict[str, dict[str, AdapterWeights]] = {}
    renamed: dict[str, dict[tuple[str, bool], AdapterWeights]] = {}
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


def kind_of(adapter: AdapterWeights) -> str:
    """Where an adapter goes: `lora` (a peft LoRA/DoRA layer) or `lycoris` (a peft LoHa/LoKr layer: LoHa, LoKr,
    and LoRAs with a dora_scale or a Tucker core)."""
    plain = isinstance(adapter, LoraPair) and adapter.dora_scale is None and adapter.mid is None
    return "lora" if plain else "lycoris"


def adapter_weights(module: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, AdapterWeights]:
    """{module path: weights} of one adapter over every layer kind, on the CPU in float32."""
    from t2i.lora.lycoris import lycoris_weights

    out: dict[str, AdapterWeights] = {}
    layers = dict(lora_layers(module))
    for path, (down, up, ratio) in lora_weights(module, adapter_name).items():
        magnitude = dora_magnitude(layers[path], adapter_name)
        out[path] = LoraPair(
            down=down.detach().float().cpu().contiguous(),
            up=up.detach().float().cpu().contiguous(),
            alpha=ratio * down.shape[0],
            magnitude=None if magnitude is None else magnitude.detach().float().cpu().contiguous(),
        )
    return out | lycoris_weights(module, adapter_name)


def file_parts(adapter: AdapterWeights, naming: str) -> dict[str, torch.Tensor]:
    """{key suffix: tensor} of one module's adapter in `peft` or `kohya` naming.

    PEFT LoRA: alpha / r folded into lora_B (diffusers reads PEFT files as alpha = r), DoRA as
    `lora_magnitude_vector`. kohya: raw factors, `alpha` and `dora_scale` (a peft magnitude goes on the output
    axis, (out, 1, ...)). LoHa/LoKr keep their LyCORIS part names in both namings; a LoKr whose factors are both
    full carries no alpha (LyCORIS' factor is 1 there; t2i has folded it into lokr_w1).
    """
    decomposition = adapter.decomposition()
    if isinstance(adapter, LoraPair) and naming == "peft":
        if adapter.mid is not None:
            raise LoraError("a Tucker LoCon (lora_mid) has no PEFT spelling; save it with naming='kohya'")
        parts = {"lora_A.weight": adapter.down, "lora_B.weight": adapter.up * adapter.ratio}
        if decomposition is not None:
            parts["lora_magnitude_vector"] = _peft_magnitude(*decomposition, adapter, adapter.up.ndim)
        return {k: v.contiguous() for k, v in parts.items()}
    if isinstance(adapter, LoraPair):
        parts = {"lora_down.weight": adapter.down, "lora_up.weight": adapter.up}
        if adapter.mid is not None:
            parts["lora_mid.weight"] = adapter.mid
    else:
        parts = adapter.matrices()
    if adapter.rank is not None:
        parts["alpha"] = torch.tensor(adapter.ratio * adapter.rank)
    if decomposition is not None:
        kind, value = decomposition
        out = adapter.out_in()[0]
        parts["dora_scale"] = value.reshape(out, *[1] * (adapter_ndim(adapter) - 1)) if kind == "magnitude" else value
    return {k: v.contiguous() for k, v in parts.items()}


def adapter_ndim(adapter: AdapterWeights) -> int:
    """The number of dimensions of the weight the adapter updates (2 for linear, 4 for conv2d)."""
    if isinstance(adapter, LoraPair):
        return adapter.down.ndim
    return 4 if any(t.ndim == 4 for t in adapter.matrices().values()) else 2


def _peft_magnitude(kind: str, value: torch.Tensor, adapter: LoraPair, ndim: int) -> torch.Tensor:
    """peft's `lora_magnitude_vector`: (out,) for linear, (1, out, 1, 1) for conv layers."""
    out = adapter.out_in()[0]
    if kind == "dora_scale" and value.numel() != out:
        raise LoraError("a DoRA on the input axis (LyCORIS dora_scale (1, in)) has no PEFT spelling; save as kohya")
    return value.reshape(out) if ndim == 2 else value.reshape(1, out, *[1] * (ndim - 2))


def lora_state_dict(
    components: list[Component], adapter_name: str = DEFAULT_ADAPTER, naming: str | None = None
) -> dict[str, torch.Tensor]:
    """The adapter's weights in `peft` (diffusers, alpha folded into lora_B) or `kohya` (LyCORIS) naming; None:
    peft for LoRA and DoRA, kohya for LoHa and LoKr (what A1111 and ComfyUI read)."""
    return _state_and_modules(components, adapter_name, naming)[0]


def _state_and_modules(
    components: list[Component], adapter_name: str, naming: str | None
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, AdapterWeights]]]:
    if naming not in (None, "peft", "kohya"):
        raise LoraError(f"naming: {naming!r}; expected peft or kohya")
    state: dict[str, torch.Tensor] = {}
    peft_modules: dict[str, dict[str, AdapterWeights]] = {}
    sdxl = any(c.prefix == "text_encoder_2" or (c.prefix == "unet" and is_sdxl_unet(c.module)) for c in components)
    for component in components:
        for path, adapter in adapter_weights(component.module, adapter_name).items():
            name = component.to_file(path)
            chosen = naming or ("peft" if kind_of(adapter) == "lora" else "kohya")
            parts = [(path, name, adapter)]
            if component.naming is not None and chosen == "peft":
                parts = [(path, n, a) for n, a in component.naming.split(path, adapter)]  # a fused module's parts
            for own_path, file_name, part in parts:
                key = f"{component.prefix}.{file_name}" if chosen == "peft" else kohya_module_name(component, own_path, sdxl)
                for suffix, tensor in file_parts(part, chosen).items():
                    state[f"{key}.{suffix}"] = tensor
                if chosen == "peft":
                    peft_modules.setdefault(component.prefix, {})[file_name] = part
    if not state:
        raise LoraError(f"adapter {adapter_name!r}: the model holds no LoRA weights of that name")
    return state, peft_modules


def kohya_module_name(component: Component, path: str, sdxl: bool) -> str:
    """kohya-ss's flat name of module `path`: `lora_unet_` + the diffusers path (SD 1/2) or the sgm path (SDXL);
    `lora_te_` (SD 1/2) or `lora_te1_` / `lora_te2_` (SDXL) + the encoder's file path (`text_model_encoder_...`)."""
    if component.prefix in KOHYA_BACKBONE:
        name = path if sdxl and component.own_paths else component.to_file(path)
        return "lora_unet_" + name.replace(".", "_")
    kohya = {"text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}[component.prefix]
    return f"{kohya}_" + component.to_file(path).replace(".", "_")


def save_lora_file(
    target: Any,
    path: str | Path,
    adapter_name: str = DEFAULT_ADAPTER,
    naming: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write adapter `adapter_name` of `target` (pipeline, {prefix: module} or backbone) as safetensors, in
    `naming` (see `lora_state_dict`), with diffusers' `lora_adapter_metadata` for its PEFT-named LoRAs and t2i's
    own record (`metadata`: rank, alpha, targets...)."""
    from safetensors.torch import save_file

    state, peft_modules = _state_and_modules(components_of(target), adapter_name, naming)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    peft_prefixes = tuple(f"{prefix}." for prefix in PREFIXES)
    namings = sorted({"peft" if key.startswith(peft_prefixes) else "kohya" for key in state})
    header = {"format": "pt", METADATA_KEY: json.dumps({"naming": "+".join(namings), **(metadata or {})})}
    diffusers_header = adapter_metadata(peft_modules)
    if diffusers_header:
        header[HEADER_KEY] = json.dumps(diffusers_header, sort_keys=True)
    partial = path.with_name(path.name + ".partial")  # a crash mid-write never leaves a truncated LoRA
    save_file(state, str(partial), metadata=header)
    os.replace(partial, path)
    return path
