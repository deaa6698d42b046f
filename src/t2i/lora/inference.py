"""LoRAs at inference: load several files into a pipeline, each with its own scale; fuse and unfuse.

    load_lora(pipe, "style.safetensors", scale=0.8)          # -> adapter name "style"
    load_lora(pipe, "concept.safetensors", scale=0.5, name="c")
    fuse_lora(pipe)      # W <- W + sum_i scale_i * alpha_i / r_i * B_i A_i ; LoRA branches off
    unfuse_lora(pipe)    # W is the original tensor again (kept aside, not recomputed)

`pipe` is a LatentPipeline (its UNet and text encoder carry the LoRAs), a CascadePipeline (a LoRA goes on the
stage it fits, or on `stage=N`), a {prefix: module} dict or a bare backbone (an Imagen UNet, taken as `unet`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from t2i.errors import LoraError
from t2i.lora.files import (
    Component,
    components_of,
    match_to_modules,
    parse_lora_state_dict,
    read_lora_file,
    read_lora_metadata,
    unet_component,
)
from t2i.lora.peft_lora import adapter_names, inject_lora, lora_layers, remove_adapter, set_adapter_scales

SCALES_ATTR = "t2i_lora_scales"  # {adapter name: scale}, kept on each component module
ORIGINAL_ATTR = "t2i_unfused_weight"  # the base weight tensor put aside by fuse_lora


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


def load_lora(
    pipe: Any, path: str | Path, scale: float = 1.0, name: str | None = None, stage: int | None = None
) -> str:
    """Add the LoRA file at `path` (PEFT/diffusers or kohya-ss naming) as adapter `name` (default: the file
    stem) at `scale`; earlier LoRAs stay active with their own scales. Returns the adapter name.

    In a cascade the LoRA goes on stage `stage`; by default on the one stage whose UNet it fits."""
    path = Path(path)
    if any(_is_fused(c) for c in components_of(pipe)):
        raise LoraError(f"{path}: the pipeline's LoRAs are fused; call unfuse_lora(pipe) before loading more")
    pairs = parse_lora_state_dict(read_lora_file(path))
    if hasattr(pipe, "stages"):
        components = [cascade_stage_component(pipe, pairs, path, stage)]
    else:
        components = components_of(pipe)
    matched = match_to_modules(pairs, components, str(path))
    name = _unique_name(pipe, name, path)
    for component in components:
        if component.prefix in matched:
            attach_pairs(component, matched[component.prefix], name)
            _scales(component.module)[name] = float(scale)
    activate(pipe)
    return name


def cascade_stage_component(cascade: Any, pairs: dict[Any, Any], path: Path, stage: int | None) -> Component:
    """The UNet component of the cascade stage that takes the LoRA: `stage`, or the only one it fits."""
    stages = [unet_component(s.unet) for s in cascade.stages]
    if stage is not None:
        if not 0 <= stage < len(stages):
            raise LoraError(f"stage: {stage} is not a stage of this cascade; expected 0 to {len(stages) - 1}")
        return stages[stage]
    fitting = [i for i, component in enumerate(stages) if lora_fits(pairs, component)]
    if len(fitting) > 1:  # stages of one architecture: the stage t2i recorded at export decides
        meta = read_lora_metadata(path)
        recorded = [i for i in fitting if stage_matches(cascade.stages[i], meta)]
        fitting = recorded if len(recorded) == 1 else fitting
    if len(fitting) == 1:
        return stages[fitting[0]]
    if not fitting:
        match_to_modules(pairs, stages[:1], f"{path} (on no stage of the cascade; stage 0's)")  # names keys
        raise LoraError(f"{path}: its weight shapes fit no stage of the cascade")
    raise LoraError(f"{path}: fits stages {fitting} of the cascade alike; pass stage=N to choose one")


def stage_matches(stage: Any, meta: dict[str, Any]) -> bool:
    """Whether `stage` is the kind of stage (unet_type, image_size) a t2i Imagen LoRA was trained on."""
    settings = stage.settings
    return (
        meta.get("unet_type") == settings.unet_type and meta.get("image_size") == settings.image_size
    )


def lora_fits(pairs: dict[Any, Any], component: Component) -> bool:
    """Whether every pair lands on a module of `component` whose weight has the pair's in/out sizes."""
    try:
        matched = match_to_modules(pairs, [component]).get(component.prefix, {})
    except LoraError:
        return False
    for module_path, pair in matched.items():
        weight = component.module.get_submodule(module_path).weight
        if weight.shape[0] != pair.up.shape[0] or weight.shape[1] != pair.down.shape[1]:
            return False
    return len(matched) == len(pairs)


def attach_pairs(component: Component, pairs: dict[str, Any], name: str) -> None:
    """Inject adapter `name` on the modules of `pairs` and copy in A and alpha / r * B (so peft's own
    alpha == rank and its scale is the user scale)."""
    import torch

    ranks = {path: pair.rank for path, pair in pairs.items()}
    inject_lora(component.module, list(pairs), ranks, alpha=None, adapter_name=name)
    layers = dict(lora_layers(component.module))
    with torch.no_grad():
        for path, pair in pairs.items():
            layer = layers[path]
            down, up = layer.lora_A[name].weight, layer.lora_B[name].weight
            for what, ours, theirs in (("down/A", down, pair.down), ("up/B", up, pair.up)):
                if ours.numel() != theirs.numel() or ours.shape[:2] != theirs.shape[:2]:
                    raise LoraError(
                        f"{component.prefix}.{component.to_file(path)}: LoRA {what} has shape {tuple(theirs.shape)}; "
                        f"the module needs {tuple(ours.shape)}"
                    )
            down.copy_(pair.down.reshape(down.shape))
            up.copy_((pair.up.float() * pair.ratio).reshape(up.shape))
    component.module.requires_grad_(False)


def activate(pipe: Any) -> None:
    """Make every loaded LoRA active at its recorded scale."""
    for component in components_of(pipe):
        set_adapter_scales(component.module, _scales(component.module))


def set_lora_scale(pipe: Any, name: str, scale: float) -> None:
    """Change the scale of a loaded LoRA (unfused pipelines only)."""
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
    return any(hasattr(layer, ORIGINAL_ATTR) for _, layer in lora_layers(component.module))


def fuse_lora(pipe: Any) -> int:
    """Add every active LoRA (at its scale) into the base weights and switch the LoRA branches off.

    The original weight tensors are kept aside untouched, so `unfuse_lora` restores them bit for bit.
    Returns the number of fused modules.
    """
    count = 0
    for component in components_of(pipe):
        if _is_fused(component):
            raise LoraError("fuse_lora: already fused; call unfuse_lora(pipe) first")
        active = list(_scales(component.module))
        for _, layer in lora_layers(component.module):
            names = [n for n in active if n in layer.lora_A]
            if not names:
                continue
            base = layer.get_base_layer()
            setattr(layer, ORIGINAL_ATTR, base.weight.data)
            base.weight.data = base.weight.data.clone()
            layer.merge(adapter_names=names)
            count += 1
    return count


def unfuse_lora(pipe: Any) -> int:
    """Put the original base weights back (the very tensors fuse_lora kept) and switch the LoRAs on again."""
    count = 0
    for component in components_of(pipe):
        for _, layer in lora_layers(component.module):
            if hasattr(layer, ORIGINAL_ATTR):
                layer.get_base_layer().weight.data = getattr(layer, ORIGINAL_ATTR)
                delattr(layer, ORIGINAL_ATTR)
                layer.merged_adapters.clear()
                count += 1
    activate(pipe)
    return count


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """`PATH[:SCALE]` (the CLI's --lora value) -> (path, scale); scale defaults to 1."""
    path, sep, scale = spec.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(scale)
        except ValueError:
            pass
    return Path(spec), 1.0


def load_loras_from_specs(pipe: Any, specs: list[str]) -> list[str]:
    """Load every `PATH[:SCALE]` of `specs` into `pipe`; returns the adapter names."""
    return [load_lora(pipe, path, scale) for path, scale in map(parse_lora_spec, specs)]
