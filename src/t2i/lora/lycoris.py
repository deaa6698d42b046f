"""LyCORIS adapters from files on peft's LoHa/LoKr layers, and LyCORIS' weight decomposition (`dora_scale`).

Installing a file's LoHa/LoKr: peft injects an adapter of that kind (its own factor shapes, from its config), then
that adapter's factors are replaced by the file's tensors, whatever factorisation the file used. peft composes
the update from whichever of its containers hold the adapter (w1 or w1_a @ w1_b; w2, w2_a @ w2_b or the Tucker
product with t2), so the file's structure is kept as it is. The containers carry LyCORIS' own part names. peft's
r and alpha are set to 1 and the file's factor, so that peft's `scale * alpha / r` is the user scale times it.

Weight decomposition (LyCORIS' DoRA: `dora_scale` beside LoRA, LoHa or LoKr weights). The update of such an
adapter becomes

    delta(s) = s * (dora_scale * (W0 + dW) / ||W0 + dW|| - W0)

with W0 the unfused base weight, dW the adapter's own update at its factor, s the user scale, and the norm taken
per output row when dora_scale is (out, 1, ...) ("wd_on_out", LyCORIS >= 3.1.1 on request) or per input column
when it is (1, in, ...) (sd-scripts' LyCORIS default). At s = 1 this is LyCORIS' merged weight. In s it is linear,
as A1111 and ComfyUI apply a strength (LyCORIS' own multiplier and peft's DoRA scale otherwise differ away from
1). A LoRA with dora_scale rides on a LoKr layer with w1 = [[1]] (kron(1, up @ down) = up @ down), so every
decomposed kind takes this one path; so does LyCORIS' Tucker LoCon (`lora_mid`), as LoKr's Tucker w2.
"""

from __future__ import annotations

import torch
from torch import nn

from t2i.errors import LoraError
from t2i.lora.adapters import AdapterWeights, LohaWeights, LokrWeights, LoraPair
from t2i.lora.peft_lora import (
    DECOMPOSED_ATTR,
    LORA_ON_LOKR_ATTR,
    ORIGINAL_ATTR,
    adapter_layers,
    inject_lora,
    layer_adapter_names,
    lycoris_layer_types,
)

# ------------------------------------------------------------------------------------------ decomposition


def decomposition_axis(dora_scale: torch.Tensor, weight_shape: torch.Size) -> int:
    """0 when `dora_scale` holds one value per output row, 1 when per input column; LoraError otherwise."""
    out, inp = int(weight_shape[0]), int(weight_shape[1])
    shape = tuple(dora_scale.shape)
    if dora_scale.numel() == out and (len(shape) < 2 or shape[0] == out):
        return 0
    if dora_scale.numel() == inp and len(shape) >= 2 and shape[0] == 1:
        return 1
    raise LoraError(
        f"dora_scale of shape {shape}: expected ({out}, 1, ...) or (1, {inp}, ...) for a weight {tuple(weight_shape)}"
    )


def weight_decomposed(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """dora_scale * (W + dW) / ||W + dW||, the norm over every axis but the one dora_scale lies on (float32)."""
    merged = (weight.float() + delta.float()).reshape(weight.shape)
    axis = decomposition_axis(dora_scale, weight.shape)
    dims = tuple(d for d in range(merged.ndim) if d != axis)
    norm = merged.square().sum(dim=dims, keepdim=True).sqrt() + torch.finfo(torch.float32).eps
    return merged * dora_scale.float().reshape(norm.shape) / norm


class WeightDecomposed:
    """Mixin over a peft LoHa/LoKr layer class: the adapters in `t2i_dora_scale` are weight-decomposed."""

    def get_delta_weight(self, adapter_name: str, *, apply_rank_dropout: bool = False) -> torch.Tensor:
        delta = super().get_delta_weight(adapter_name, apply_rank_dropout=apply_rank_dropout)
        decomposed = getattr(self, DECOMPOSED_ATTR, {})
        if adapter_name not in decomposed:
            return delta
        strength = self.scaling[adapter_name] / (self.alpha[adapter_name] / self.r[adapter_name])
        if strength == 0:
            return torch.zeros_like(delta)
        base = self.get_base_layer()
        original = getattr(base, ORIGINAL_ATTR, base.weight)  # while fusing, base.weight holds earlier merges
        merged = weight_decomposed(original, delta / strength, decomposed[adapter_name])
        return (strength * (merged - original.float())).to(delta.dtype)


_DECOMPOSED_CLASSES: dict[type, type] = {}


def _decomposed_class(cls: type) -> type:
    if issubclass(cls, WeightDecomposed):
        return cls
    if cls not in _DECOMPOSED_CLASSES:
        _DECOMPOSED_CLASSES[cls] = type(f"Decomposed{cls.__name__}", (WeightDecomposed, cls), {"__module__": __name__})
    return _DECOMPOSED_CLASSES[cls]


def decompose_adapter(layer: nn.Module, adapter_name: str, dora_scale: torch.Tensor) -> None:
    """Make `adapter_name` of a LyCORIS layer weight-decomposed with `dora_scale` (kept on the layer's device)."""
    weight = layer.get_base_layer().weight
    decomposition_axis(dora_scale, weight.shape)  # checks the shape
    layer.__class__ = _decomposed_class(type(layer))
    if not hasattr(layer, DECOMPOSED_ATTR):
        setattr(layer, DECOMPOSED_ATTR, nn.ParameterDict())
    scale = dora_scale.detach().to(device=weight.device, dtype=torch.float32)
    getattr(layer, DECOMPOSED_ATTR)[adapter_name] = nn.Parameter(scale, requires_grad=False)


# ------------------------------------------------------------------------------------------ installing


def lycoris_parts(adapter: AdapterWeights, weight_shape: torch.Size) -> tuple[str, dict[str, torch.Tensor]]:
    """(peft kind, {peft container: tensor}) that compose `adapter`'s update on a weight of `weight_shape`."""
    if isinstance(adapter, LoraPair):  # kron(1, up @ down): a LoKr with a 1 x 1 first factor
        parts = {"lokr_w1": torch.ones(1, 1, dtype=adapter.up.dtype)}
        if adapter.mid is None:
            return "lokr", parts | {"lokr_w2_a": adapter.up.flatten(1), "lokr_w2_b": adapter.down.flatten(1)}
        # Tucker LoCon: W[o, i] = sum_ab mid[a, b] up[o, a] down[b, i], LoKr's Tucker w2 with w2_a = up^T
        if tuple(adapter.mid.shape[2:]) != tuple(weight_shape[2:]):
            raise LoraError(f"lora_mid of shape {tuple(adapter.mid.shape)}: expected kernel {tuple(weight_shape[2:])}")
        tucker = {"lokr_t2": adapter.mid, "lokr_w2_a": adapter.up.flatten(1).T, "lokr_w2_b": adapter.down.flatten(1)}
        return "lokr", parts | tucker
    parts = adapter.matrices()
    kernel = tuple(weight_shape[2:])
    tucker = adapter.hada_t1 is not None if isinstance(adapter, LohaWeights) else adapter.lokr_t2 is not None
    for name in ("hada_w1_b", "hada_w2_b", "lokr_w2_b"):  # peft wants them flat over (in, k, k) unless Tucker
        if name in parts and not tucker:
            parts[name] = parts[name].flatten(1)
    if "lokr_t2" in parts or "hada_t1" in parts:
        cores = [n for n in ("lokr_t2", "hada_t1", "hada_t2") if n in parts]
        if any(tuple(parts[n].shape[2:]) != kernel for n in cores):
            raise LoraError(f"Tucker core of shape {tuple(parts[cores[0]].shape)}: expected kernel {kernel}")
    return adapter.kind, parts


def attach_lycoris(module: nn.Module, adapters: dict[str, AdapterWeights], name: str, label: str) -> None:
    """Inject adapter `name` on `module`'s paths from LoHa/LoKr weights and LoRAs with dora_scale, each at its
    factor, decomposed where it has a dora_scale. `label(path)` names a module in errors."""
    planned = {}
    for path, adapter in adapters.items():
        weight = _base_weight(module.get_submodule(path))
        if not adapter.fits(weight.shape):
            raise LoraError(
                f"{label(path)}: {adapter.kind} update of size {adapter.out_in()} (out, in*k*k) does not fit "
                f"the module's weight {tuple(weight.shape)}"
            )
        planned[path] = (*lycoris_parts(adapter, weight.shape), adapter)
    for kind in ("loha", "lokr"):
        paths = [p for p, (k, _, _) in planned.items() if k == kind]
        if paths:
            inject_lora(module, paths, rank=1, alpha=1.0, adapter_name=name, kind=kind)
    layers = {path: layer for path, layer in adapter_layers(module) if name in layer_adapter_names(layer)}
    for path, (_, parts, adapter) in planned.items():
        layer = layers[path]
        install(layer, name, parts, adapter.ratio)
        if isinstance(adapter, LoraPair):
            if not hasattr(layer, LORA_ON_LOKR_ATTR):
                setattr(layer, LORA_ON_LOKR_ATTR, set())
            getattr(layer, LORA_ON_LOKR_ATTR).add(name)
        if adapter.dora_scale is not None:
            decompose_adapter(layer, name, adapter.dora_scale)


def install(layer: nn.Module, name: str, parts: dict[str, torch.Tensor], ratio: float) -> None:
    """Replace adapter `name`'s factors in a peft LyCORIS layer by `parts` ({container: tensor}), at `ratio`."""
    weight = layer.get_base_layer().weight
    for container in layer.adapter_layer_names:
        if name in getattr(layer, container):
            del getattr(layer, container)[name]
    for container, tensor in parts.items():
        value = tensor.detach().to(device=weight.device, dtype=weight.dtype)
        getattr(layer, container)[name] = nn.Parameter(value, requires_grad=False)
    layer.r[name], layer.alpha[name], layer.scaling[name] = 1, float(ratio), float(ratio)


def _base_weight(module: nn.Module) -> torch.Tensor:
    return module.get_base_layer().weight if hasattr(module, "get_base_layer") else module.weight


# ------------------------------------------------------------------------------------------ reading back


def lycoris_weights(module: nn.Module, adapter_name: str) -> dict[str, AdapterWeights]:
    """{module path: LohaWeights | LokrWeights | LoraPair (a LoRA with dora_scale)} of one adapter's LyCORIS
    layers, factors on the CPU in float32, alpha such that alpha / r is the factor."""
    out: dict[str, AdapterWeights] = {}
    for path, layer in adapter_layers(module):
        if not isinstance(layer, lycoris_layer_types()) or adapter_name not in layer_adapter_names(layer):
            continue
        parts = {
            container: getattr(layer, container)[adapter_name].detach().float().cpu().contiguous()
            for container in layer.adapter_layer_names
            if adapter_name in getattr(layer, container)
        }
        ratio = float(layer.alpha[adapter_name]) / float(layer.r[adapter_name])
        decomposed = getattr(layer, DECOMPOSED_ATTR, {})
        dora_scale = decomposed[adapter_name].detach().float().cpu() if adapter_name in decomposed else None
        out[path] = _weights_from_parts(layer, adapter_name, parts, ratio, dora_scale)
    return out


def _lora_from_lokr_parts(
    parts: dict[str, torch.Tensor], shape: torch.Size, ratio: float, dora_scale: torch.Tensor | None
) -> LoraPair:
    """The LoRA (or Tucker LoCon) that `lycoris_parts` put on a LoKr layer, in kohya's shapes."""
    ones = [1] * (len(shape) - 2)
    up = parts["lokr_w2_a"] * parts["lokr_w1"].reshape(())
    mid = parts.get("lokr_t2")
    if mid is None:
        down = parts["lokr_w2_b"].reshape(-1, *shape[1:])
    else:
        up, down = up.T, parts["lokr_w2_b"].reshape(-1, shape[1], *ones)
    up = up.reshape(shape[0], -1, *ones)
    return LoraPair(down=down, up=up, alpha=ratio * down.shape[0], dora_scale=dora_scale, mid=mid)


def _weights_from_parts(
    layer: nn.Module, name: str, parts: dict[str, torch.Tensor], ratio: float, dora_scale: torch.Tensor | None
) -> AdapterWeights:
    shape = layer.get_base_layer().weight.shape
    if name in getattr(layer, LORA_ON_LOKR_ATTR, ()):
        return _lora_from_lokr_parts(parts, shape, ratio, dora_scale)
    cls = LohaWeights if "hada_w1_a" in parts else LokrWeights
    weights = cls(**parts, dora_scale=dora_scale)
    rank = weights.rank
    if rank is None:  # both LoKr factors full: LyCORIS applies no factor, so it goes into w1
        weights.lokr_w1 = weights.lokr_w1 * ratio
    else:
        weights.alpha = ratio * rank
    return weights

