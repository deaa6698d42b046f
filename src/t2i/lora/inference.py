"""LoRAs at inference: load several files into a pipeline, each with its own scale; fuse and unfuse.

    load_lora(pipe, "style.safetensors", scale=0.8)          # -> adapter name "style"
    load_lora(pipe, "concept.safetensors", scale=0.5, name="c")
    fuse_lora(pipe)      # W <- W + sum_i scale_i * delta_i ; the adapter branches off
    unfuse_lora(pipe)    # W is the original tensor again (kept aside, not recomputed)

Every kind a file can hold goes through this: LoRA and DoRA on peft LoRA layers, LoHa and LoKr (and LoRAs with
LyCORIS' `dora_scale`) on peft's LyCORIS layers (`t2i.lora.lycoris`). A module with several kinds nests them:
the LoRA layer directly on the base module, the LyCORIS layers above it; fusing merges from the inside out.

`pipe` is anything `t2i.lora.files.adapter_slots` accepts: a pipeline says which of its modules take adapters
(`adapter_slots()`: the SD pipeline one slot, UNet and text encoder; a cascade one per stage, and a LoRA goes on
the stage it fits, or on `stage=N`), or a {prefix: module} dict, or a bare backbone (taken as `unet`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from t2i.errors import LoraError, checked_arguments
from t2i.lora.adapters import AdapterWeights, LoraPair
from t2i.lora.files import (
    Component,
    adapter_slots,
    components_of,
    kind_of,
    match_to_modules,
    parse_lora_state_dict,
    read_lora_file,
    read_lora_metadata,
    slot_components,
)
from t2i.lora.lycoris import attach_lycoris
from t2i.lora.metadata import read_adapter_metadata
from t2i.lora.peft_lora import (
    ORIGINAL_ATTR,
    adapter_layers,
    adapter_names,
    inject_lora,
    layer_adapter_names,
    lora_layers,
    nesting_depth,
    remove_adapter,
    set_adapter_scales,
)

SCALES_ATTR = "t2i_lora_scales"  # {adapter name: scale}, kept on each component module


def _scales(module: nn.Module) -> dict[str, float]:
    if not hasattr(module, SCALES_ATTR):
        setattr(module, SCALES_ATTR, {})
    return getattr(module, SCALES_ATTR)


def loaded_loras(pipe: Any) -> dict[str, float]:
    """{adapter name: scale} of the LoRAs loaded into `pipe`."""
    scales: dict[str, float] = {}
    for component in components_of(pipe):
        scales.update(_scales(component.module))
    return scales


def _unique_name(pipe: Any, name: str | None, path: Path) -> str:
    taken = set(loaded_loras(pipe))
    for component in components_of(pipe):
        taken.update(adapter_names(component.module))
    if name is not None:
        if name in taken:
            raise LoraError(f"name: a LoRA called {name!r} is already loaded; pick another name")
        return name
    base = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in path.stem) or "lora"
    candidate, i = base, 1
    while candidate in taken:
        candidate, i = f"{base}_{i}", i + 1
    return candidate


@checked_arguments
def load_lora(
    pipe: Any, path: str | Path, scale: float = 1.0, name: str | None = None, stage: int | None = None
) -> str:
    """Add the LoRA file at `path` (PEFT/diffusers or kohya/LyCORIS naming: LoRA, DoRA, LoHa, LoKr) as adapter
    `name` (default: the file stem) at `scale`; earlier LoRAs stay active with their own scales. The factors come
    from the file's `.alpha` keys or its `lora_adapter_metadata` header. Returns the adapter name.

    In a cascade the LoRA goes on stage `stage`; by default on the one stage whose UNet it fits."""
    if path is None or not isinstance(path, (str, Path)):
        raise LoraError(f"path: {path!r}; expected the path of a LoRA .safetensors file")
    path, scale = Path(path), check_scale(scale)
    if any(_is_fused(c) for c in components_of(pipe)):
        raise LoraError(f"{path}: the pipeline's LoRAs are fused; call unfuse_lora(pipe) before loading more")
    pairs = parse_lora_state_dict(read_lora_file(path), read_adapter_metadata(path), str(path))
    components = choose_slot(pipe, pairs, path, stage)
    matched = match_to_modules(pairs, components, str(path))
    name = _unique_name(pipe, name, path)
    for component in components:
        if component.prefix in matched:
            attach_pairs(component, matched[component.prefix], name)
            _scales(component.module)[name] = float(scale)
    activate(pipe)
    return name


def choose_slot(pipe: Any, pairs: dict[Any, Any], path: Path, stage: int | None) -> list[Component]:
    """The components of the slot that takes the LoRA: `stage`, the only slot it fits, or among several that fit
    the one whose recorded training metadata the pipeline says it matches (`adapter_slot_matches`)."""
    slots = [slot_components(slot) for slot in adapter_slots(pipe)]
    if stage is not None:
        if not 0 <= stage < len(slots):
            raise LoraError(f"stage: {stage} is not a stage of this cascade; expected 0 to {len(slots) - 1}")
        return slots[stage]
    if len(slots) == 1:
        return slots[0]
    fitting = [i for i, slot in enumerate(slots) if lora_fits(pairs, slot)]
    if len(fitting) > 1 and hasattr(pipe, "adapter_slot_matches"):
        meta = read_lora_metadata(path)
        recorded = [i for i in fitting if pipe.adapter_slot_matches(i, meta)]
        fitting = recorded if len(recorded) == 1 else fitting
    if len(fitting) == 1:
        return slots[fitting[0]]
    if not fitting:
        match_to_modules(pairs, slots[0], f"{path} (on no stage of the cascade; stage 0's)")  # names the keys
        raise LoraError(f"{path}: its weight shapes fit no stage of the cascade")
    raise LoraError(f"{path}: fits stages {fitting} of the cascade alike; pass stage=N to choose one")


def lora_fits(pairs: dict[Any, AdapterWeights], components: list[Component]) -> bool:
    """Whether every adapter lands on a module of `components` whose weight has the adapter's in/out sizes."""
    try:
        matched = match_to_modules(pairs, components)
    except LoraError:
        return False
    by_prefix = {c.prefix: c for c in components}
    for prefix, modules in matched.items():
        for module_path, adapter in modules.items():
            module = by_prefix[prefix].module.get_submodule(module_path)
            weight = module.get_base_layer().weight if hasattr(module, "get_base_layer") else module.weight
            if not adapter.fits(weight.shape):
                return False
    return sum(len(m) for m in matched.values()) == len(pairs)


def attach_pairs(component: Component, pairs: dict[str, AdapterWeights], name: str) -> None:
    """Inject adapter `name` on the modules of `pairs`: LoRAs (and DoRAs) on peft LoRA layers with A and
    alpha / r * B copied in (so peft's own alpha == rank and its scale is the user scale), the rest on peft's
    LyCORIS layers."""
    lora = {path: pair for path, pair in pairs.items() if kind_of(pair) == "lora"}
    for dora in (False, True):
        group = {path: pair for path, pair in lora.items() if (pair.magnitude is not None) == dora}
        if group:
            _attach_lora_group(component, group, name, dora)
    lycoris = {path: adapter for path, adapter in pairs.items() if path not in lora}
    if lycoris:
        attach_lycoris(component.module, lycoris, name, lambda path: f"{component.prefix}.{component.to_file(path)}")
    component.module.requires_grad_(False)


def _attach_lora_group(component: Component, pairs: dict[str, LoraPair], name: str, dora: bool) -> None:
    import torch

    ranks = {path: pair.rank for path, pair in pairs.items()}
    inject_lora(component.module, list(pairs), ranks, alpha=None, adapter_name=name, dora=dora)
    layers = dict(lora_layers(component.module))
    with torch.no_grad():
        for path, pair in pairs.items():
            layer = layers[path]
            down, up = layer.lora_A[name].weight, layer.lora_B[name].weight
            checks = [("down/A", down, pair.down), ("up/B", up, pair.up)]
            if dora:
                checks.append(("lora_magnitude_vector", layer.lora_magnitude_vector[name].weight, pair.magnitude))
            for what, ours, theirs in checks:
                vector = what == "lora_magnitude_vector"  # (out,) or (1, out, 1, 1): only the count matters
                if ours.numel() != theirs.numel() or not vector and ours.shape[:2] != theirs.shape[:2]:
                    raise LoraError(
                        f"{component.prefix}.{component.to_file(path)}: LoRA {what} has shape {tuple(theirs.shape)}; "
                        f"the module needs {tuple(ours.shape)}"
                    )
            down.copy_(pair.down.reshape(down.shape))
            up.copy_((pair.up.float() * pair.ratio).reshape(up.shape))
            if dora:
                magnitude = layer.lora_magnitude_vector[name].weight
                magnitude.copy_(pair.magnitude.reshape(magnitude.shape))


def activate(pipe: Any) -> None:
    """Make every loaded LoRA active at its recorded scale."""
    for component in components_of(pipe):
        set_adapter_scales(component.module, _scales(component.module))


def set_lora_scale(pipe: Any, name: str, scale: float) -> None:
    """Change the scale of a loaded LoRA (unfused pipelines only)."""
    scale = check_scale(scale)
    if name not in loaded_loras(pipe):
        raise LoraError(
            f"name: no LoRA {name!r} is loaded; loaded: {', '.join(loaded_loras(pipe)) or 'none'}"
        )
    if any(_is_fused(c) for c in components_of(pipe)):
        raise LoraError("set_lora_scale: the LoRAs are fused; call unfuse_lora(pipe) first")
    for component in components_of(pipe):
        if name in _scales(component.module):
            _scales(component.module)[name] = float(scale)
    activate(pipe)


def unload_lora(pipe: Any, name: str | None = None) -> None:
    """Remove one LoRA (or all); the remaining ones stay active."""
    if any(_is_fused(c) for c in components_of(pipe)):
        unfuse_lora(pipe)
    for component in components_of(pipe):
        scales = _scales(component.module)
        for adapter in [name] if name is not None else list(scales):
            if adapter in scales:
                remove_adapter(component.module, adapter)
                del scales[adapter]
    activate(pipe)


def _is_fused(component: Component) -> bool:
    return any(layer.merged for _, layer in adapter_layers(component.module))


def fuse_lora(pipe: Any) -> int:
    """Add every active adapter (at its scale) into the base weights and switch the adapter branches off.

    The original weight tensors are kept aside untouched, so `unfuse_lora` restores them bit for bit. Nested
    layers merge from the inside out (a DoRA's norm needs the base weight before the updates above it).
    Returns the number of fused layers.
    """
    count = 0
    for component in components_of(pipe):
        if _is_fused(component):
            raise LoraError("fuse_lora: already fused; call unfuse_lora(pipe) first")
        active = list(_scales(component.module))
        layers = sorted((layer for _, layer in adapter_layers(component.module)), key=nesting_depth)
        for layer in layers:
            names = [n for n in active if n in layer_adapter_names(layer)]
            if not names:
                continue
            base = layer.get_base_layer()
            if not hasattr(base, ORIGINAL_ATTR):
                setattr(base, ORIGINAL_ATTR, base.weight.data)
                base.weight.data = base.weight.data.clone()
            layer.merge(adapter_names=names)
            count += 1
    return count


def unfuse_lora(pipe: Any) -> int:
    """Put the original base weights back (the very tensors fuse_lora kept) and switch the adapters on again."""
    count = 0
    for component in components_of(pipe):
        for _, layer in adapter_layers(component.module):
            base = layer.get_base_layer()
            if hasattr(base, ORIGINAL_ATTR):
                base.weight.data = getattr(base, ORIGINAL_ATTR)
                delattr(base, ORIGINAL_ATTR)
            if layer.merged_adapters:
                layer.merged_adapters.clear()
                count += 1
    activate(pipe)
    return count


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """`PATH[:SCALE]` (the CLI's --lora value) -> (path, scale); scale defaults to 1. A suffix after the last
    colon that is neither a path part nor a number is a bad scale (LoraError), unless the whole spec is a file."""
    path, sep, scale = spec.rpartition(":")
    if not sep or not path or Path(spec).exists() or "/" in scale or "\\" in scale:
        return Path(spec), 1.0
    try:
        return Path(path), check_scale(float(scale), spec)
    except ValueError:
        raise LoraError(f"--lora {spec}: scale {scale!r} is not a number; expected PATH or PATH:SCALE such as "
                        "style.safetensors:0.8") from None


def check_scale(scale: Any, what: str = "scale") -> float:
    """A finite LoRA scale as a float; LoraError otherwise."""
    import math

    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise LoraError(f"{what}: scale {scale!r}; expected a finite number (1 = the LoRA as trained)")
    return float(scale)


def load_loras_from_specs(pipe: Any, specs: list[str]) -> list[str]:
    """Load every `PATH[:SCALE]` of `specs` into `pipe`; returns the adapter names."""
    return [load_lora(pipe, path, scale) for path, scale in map(parse_lora_spec, specs)]
