"""LoRA adapters on a backbone through `peft`: which modules get one, injecting them, and reading them back.

A LoRA replaces a linear (or conv) `W x` by `W x + scale * (alpha / r) * B A x`, with A (r, in) and
B (out, r) the only trained weights (Hu et al. 2021, eq. 3). `peft` wraps each targeted module in a `LoraLayer`
that holds several named adapters; this file only decides the targets and reads the layers.

Targets are resolved to full module paths here (not peft suffixes), because the Imagen blocks reuse the name
`proj_out` for attention outputs, feed-forward outputs and 1x1 convs alike.

Besides LoRA (optionally DoRA: `use_dora`, a learnt magnitude per output row), peft's LyCORIS layers carry LoHa
and LoKr adapters (`t2i.lora.adapters` has the formulas). Several kinds on one module nest: each peft layer wraps
the one below (`base_layer`). A LoRA layer is kept directly on the base module, under every LyCORIS layer
(`lora_layer_at_bottom`), because DoRA's norm must see the base weight alone; LyCORIS updates add on top.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from t2i.errors import LoraError

DEFAULT_ADAPTER = "default"
# SD UNet (CrossAttention) projections; `ff` adds the GEGLU feed-forward.
SD_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
SD_FEED_FORWARD = ("net.0.proj", "net.2")  # inside FeedForward
# Imagen attention blocks (imagen_blocks.*AttentionBlock) and the GEGLU feed-forward.
IMAGEN_ATTENTION = ("q", "kv", "qkv", "kv_self", "kv_context", "proj_out")
IMAGEN_FEED_FORWARD = ("proj_in", "proj_out")
# ResBlock convolutions and their time-embedding projection (LoCon-style `conv`), SD then Imagen names.
SD_RESBLOCK = ("in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection")
IMAGEN_RESBLOCK = ("in_conv", "out_conv", "emb_proj", "skip", "shortcut")
# Hugging Face text encoders (CLIP attention names).
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
# Flux blocks (BFL names): the double blocks' fused q/k/v and output projections per stream, the single blocks'
# fused in (q, k, v, MLP in) and out (attention, MLP out) projections; `ff` adds the double blocks' MLPs.
FLUX_ATTENTION = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "linear1", "linear2")
FLUX_FEED_FORWARD = ("img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")
TARGET_GROUPS = ("attention", "ff", "conv")


ADAPTER_KINDS = ("lora", "loha", "lokr")
# the names of peft's per-adapter parameter containers, for every kind t2i uses
LORA_PARAMETER_PARTS = ("lora_A", "lora_B", "lora_magnitude_vector")
LOHA_PARAMETER_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARAMETER_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
ADAPTER_PARAMETER_PARTS = LORA_PARAMETER_PARTS + LOHA_PARAMETER_PARTS + LOKR_PARAMETER_PARTS
ORIGINAL_ATTR = "t2i_unfused_weight"  # on a base module: its weight tensor as it was before fuse_lora
DECOMPOSED_ATTR = "t2i_dora_scale"  # on a LyCORIS layer: {adapter: LyCORIS dora_scale} (t2i.lora.lycoris)
LORA_ON_LOKR_ATTR = "t2i_lora_on_lokr"  # on a LoKr layer: its adapters that are LoRAs with dora_scale


def lora_layer_types() -> tuple[type, ...]:
    from peft.tuners.lora import LoraLayer

    return (LoraLayer,)


def lycoris_layer_types() -> tuple[type, ...]:
    from peft.tuners.lycoris_utils import LycorisLayer

    return (LycorisLayer,)


def adapter_layer_types() -> tuple[type, ...]:
    return lora_layer_types() + lycoris_layer_types()


def _is_attention_parent(module: nn.Module) -> bool:
    from t2i.models.attention import CrossAttention
    from t2i.models.imagen_blocks import AttentionBlockBase

    return isinstance(module, (CrossAttention, AttentionBlockBase))


def _is_flux_block(module: nn.Module) -> bool:
    from t2i.models.flux import DoubleStreamBlock, SingleStreamBlock

    return isinstance(module, (DoubleStreamBlock, SingleStreamBlock))


def _is_feed_forward_parent(module: nn.Module) -> bool:
    from t2i.models.imagen_blocks import GEGLUFeedForward
    from t2i.models.unet import FeedForward

    return isinstance(module, (FeedForward, GEGLUFeedForward))


def is_adaptable(module: nn.Module) -> bool:
    """A module a LoRA can sit on: a linear or conv layer, or one peft has already wrapped."""
    return isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d, *adapter_layer_types()))


def _is_resblock_parent(module: nn.Module) -> bool:
    from t2i.models.imagen_blocks import EfficientResBlock
    from t2i.models.imagen_blocks import ResBlock as ImagenResBlock
    from t2i.models.unet import ResBlock

    return isinstance(module, (ResBlock, ImagenResBlock, EfficientResBlock))


def _children_matching(
    parent_name: str, parent: nn.Module, suffixes: Sequence[str], kinds: tuple[type, ...] = (nn.Linear,)
) -> Iterator[str]:
    for suffix in suffixes:
        try:
            child = parent.get_submodule(suffix)
        except AttributeError:
            continue
        if isinstance(child, (*kinds, *adapter_layer_types())):
            yield f"{parent_name}.{suffix}" if parent_name else suffix


def default_targets(model: nn.Module, groups: Sequence[str] = ("attention",)) -> list[str]:
    """Full module paths of `model` that get a LoRA: attention q/k/v/out projections (`attention`), the
    feed-forward linears (`ff`) and/or the ResBlock convolutions with their time-embedding projections
    (`conv`), for the SD UNet, the Imagen UNets, the Flux transformer's blocks and Hugging Face text encoders."""
    unknown = [g for g in groups if g not in TARGET_GROUPS]
    if unknown:
        raise LoraError(f"lora target group {unknown[0]!r}: unknown; expected {', '.join(TARGET_GROUPS)}")
    found: list[str] = []
    for name, module in model.named_modules():
        if "attention" in groups and _is_attention_parent(module):
            found += _children_matching(name, module, SD_ATTENTION + IMAGEN_ATTENTION)
        if "ff" in groups and _is_feed_forward_parent(module):
            found += _children_matching(name, module, SD_FEED_FORWARD + IMAGEN_FEED_FORWARD)
        if _is_flux_block(module):
            if "attention" in groups:
                found += _children_matching(name, module, FLUX_ATTENTION)
            if "ff" in groups:
                found += _children_matching(name, module, FLUX_FEED_FORWARD)
        if "conv" in groups and _is_resblock_parent(module):
            found += _children_matching(name, module, SD_RESBLOCK + IMAGEN_RESBLOCK, (nn.Linear, nn.Conv2d))
        if (
            "attention" in groups
            and type(module).__name__.endswith("Attention")
            and hasattr(module, "q_proj")
        ):
            found += _children_matching(name, module, TEXT_ATTENTION)
    return sorted(set(found))


def resolve_targets(model: nn.Module, target_modules: Sequence[str] | None) -> list[str]:
    """`target_modules` (None: attention; group names `attention`/`ff`; or module-name suffixes such as
    `to_q` or `attn2.to_k`) -> full module paths of `model`. LoraError when a name matches nothing."""
    if target_modules is None:
        return default_targets(model)
    names = list(target_modules)
    groups = [n for n in names if n in TARGET_GROUPS]
    paths = set(default_targets(model, groups)) if groups else set()
    modules = [
        name
        for name, m in model.named_modules()
        if name and is_adaptable(m) and not is_adapter_internal(name)
    ]
    for suffix in (n for n in names if n not in TARGET_GROUPS):
        hits = [m for m in modules if m == suffix or m.endswith("." + suffix)]
        if not hits:
            raise LoraError(
                f"model.lora.target_modules: {suffix!r} matches no linear/conv module of the model"
            )
        paths.update(hits)
    if not paths:
        raise LoraError(f"model.lora.target_modules: {names} selects no module of the model")
    return sorted(paths)


def is_adapter_internal(name: str) -> bool:
    """Whether a module name lies inside a peft layer (its base layer or its adapter containers)."""
    return ".base_layer" in name or any(f".{part}" in name for part in ADAPTER_PARAMETER_PARTS)


def _exact(path: str) -> str:
    return re.escape(path)


def _config_patterns(
    targets: list[str], rank: int | dict[str, int], alpha: float | dict[str, float] | None
) -> tuple[int, float, dict[str, int], dict[str, float]]:
    """(r, alpha, rank_pattern, alpha_pattern) for peft: the most common values plus exact-path exceptions."""
    ranks = rank if isinstance(rank, dict) else dict.fromkeys(targets, int(rank))
    alphas = alpha if isinstance(alpha, dict) else dict.fromkeys(targets, alpha)
    alphas = {t: float(ranks[t] if alphas.get(t) is None else alphas[t]) for t in targets}
    r = Counter(ranks[t] for t in targets).most_common(1)[0][0]
    a = Counter(alphas[t] for t in targets).most_common(1)[0][0]
    rank_pattern = {_exact(t): ranks[t] for t in targets if ranks[t] != r}
    alpha_pattern = {_exact(t): alphas[t] for t in targets if alphas[t] != a}
    return r, a, rank_pattern, alpha_pattern


def peft_config(
    kind: str,
    targets: list[str],
    rank: int | dict[str, int],
    alpha: float | dict[str, float] | None = None,
    dropout: float = 0.0,
    dora: bool = False,
) -> object:
    """The peft config of one adapter kind on `targets` (full paths): `LoraConfig` (optionally DoRA),
    `LoHaConfig` or `LoKrConfig` (LyCORIS' default factorisation: w1 full, w2 low-rank where r is small)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    r, a, rank_pattern, alpha_pattern = _config_patterns(targets, rank, alpha)
    common = {"target_modules": targets, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "r": r}
    if kind == "lora":
        return LoraConfig(lora_alpha=a, lora_dropout=float(dropout), use_dora=dora, **common)
    if dora or dropout:
        raise LoraError(f"{kind}: peft trains {kind} without DoRA and without input dropout; set them off")
    if kind == "loha":
        return LoHaConfig(alpha=a, **common)
    if kind == "lokr":
        return LoKrConfig(alpha=a, **common)
    raise LoraError(f"model.lora.type: {kind!r}; expected one of {', '.join(ADAPTER_KINDS)}")


def inject_lora(
    model: nn.Module,
    targets: Sequence[str],
    rank: int | dict[str, int],
    alpha: float | dict[str, float] | None = None,
    dropout: float = 0.0,
    adapter_name: str = DEFAULT_ADAPTER,
    kind: str = "lora",
    dora: bool = False,
) -> nn.Module:
    """Add adapter `adapter_name` of `kind` (lora | loha | lokr) to the modules at `targets` (full paths) with peft
    `inject_adapter_in_model`.

    `rank`/`alpha` are one value or one per path (alpha None = rank, i.e. scale 1). peft's initialisation leaves
    the model's output unchanged until training (LoRA: B = 0; LoHa: w2_b = 0; LoKr: w1 = 0). Base weights are
    frozen.
    """
    from peft import inject_adapter_in_model

    targets = list(targets)
    if not targets:
        raise LoraError("lora: no target modules given")
    config = peft_config(kind, targets, rank, alpha, dropout, dora)
    with warnings.catch_warnings(), lora_layer_at_bottom(model, targets if kind == "lora" else []):
        # a second adapter on the same model is intended (several LoRAs at once)
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_parameter(name, adapter_name))
    return model


@contextlib.contextmanager
def lora_layer_at_bottom(model: nn.Module, paths: Sequence[str]) -> Iterator[None]:
    """Inside the block each module at `paths` that is a LyCORIS layer is replaced by what lies under its LyCORIS
    layers (the base module or a LoRA layer), so that peft puts a LoRA there; the LyCORIS layers go back on top
    of the result on exit."""
    lifted = []
    for path in paths:
        top = model.get_submodule(path)
        if not isinstance(top, lycoris_layer_types()):
            continue
        bottom = top
        while isinstance(bottom.base_layer, lycoris_layer_types()):
            bottom = bottom.base_layer
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, attr, bottom.base_layer)
        lifted.append((parent, attr, top, bottom))
    try:
        yield
    finally:
        for parent, attr, top, bottom in lifted:
            bottom.base_layer = getattr(parent, attr)
            setattr(parent, attr, top)


def apply_lora(
    model: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
    kind: str = "lora",
    dora: bool = False,
) -> list[str]:
    """Give `model` a trainable adapter of `kind` (lora | loha | lokr; `dora` for weight-decomposed LoRA) on
    `target_modules` (see `resolve_targets`); returns the adapted paths.

    Only the new adapter weights require grad afterwards.
    """
    if not isinstance(rank, int) or rank < 1:
        raise LoraError(f"model.lora.rank: {rank!r}; expected an integer >= 1")
    targets = resolve_targets(model, target_modules)
    inject_lora(model, targets, rank, alpha, dropout, adapter_name, kind=kind, dora=dora)
    return targets


def is_lora_parameter(name: str, adapter_name: str | None = None) -> bool:
    """Whether a parameter name (from named_parameters) is an adapter weight (LoRA A/B, DoRA magnitude, LoHa or
    LoKr factor) of `adapter_name` (or of any adapter)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ADAPTER_PARAMETER_PARTS and (adapter_name is None or parts[i + 1] == adapter_name):
            return True
    return False


def lora_parameters(model: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The adapter parameters of `model` (of one adapter, or all)."""
    return [p for n, p in model.named_parameters() if is_lora_parameter(n, adapter_name)]


def module_path(name: str) -> str:
    """A peft layer's path as in the un-adapted model (nested layers sit at `path.base_layer...`)."""
    return name.replace(".base_layer", "")


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, peft layer) for every adapter layer of any kind, path as in the un-adapted model; a module with
    several kinds appears once per layer, outermost first."""
    for name, module in model.named_modules():
        if isinstance(module, adapter_layer_types()):
            yield module_path(name), module


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, peft LoraLayer) for every LoRA-adapted module, path as in the un-adapted model."""
    for path, layer in adapter_layers(model):
        if isinstance(layer, lora_layer_types()):
            yield path, layer


def nesting_depth(layer: nn.Module) -> int:
    """How many peft layers lie under `layer` (0: it wraps the base module itself)."""
    depth, inner = 0, layer.base_layer
    while isinstance(inner, adapter_layer_types()):
        depth, inner = depth + 1, inner.base_layer
    return depth


def layer_adapter_names(layer: nn.Module) -> list[str]:
    """The adapters a peft layer holds."""
    if isinstance(layer, lora_layer_types()):
        return list(layer.lora_A.keys())
    return sorted(layer._available_adapters)


@contextlib.contextmanager
def adapters_disabled(*models: nn.Module) -> Iterator[None]:
    """Run `models` as their base alone: every adapter layer bypassed inside the block, restored after."""
    layers = [layer for model in models for _, layer in adapter_layers(model)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters held anywhere in `model`, in first-seen order."""
    names: dict[str, None] = {}
    for _, layer in adapter_layers(model):
        names.update(dict.fromkeys(layer_adapter_names(layer)))
    return list(names)


def lora_weights(
    model: nn.Module, adapter_name: str = DEFAULT_ADAPTER
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module path: (A (r, in, ...), B (out, r, ...), alpha / r)} of one adapter's LoRA layers."""
    out = {}
    for path, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            ratio = float(layer.lora_alpha[adapter_name]) / float(layer.r[adapter_name])
            out[path] = (layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight, ratio)
    return out


def dora_magnitude(layer: nn.Module, adapter_name: str) -> torch.Tensor | None:
    """peft's DoRA magnitude (one per output row) of a LoRA layer's adapter, None when it is plain LoRA."""
    magnitudes = getattr(layer, "lora_magnitude_vector", None) or {}
    return magnitudes[adapter_name].weight if adapter_name in magnitudes else None


def delta_weight(down: torch.Tensor, up: torch.Tensor, factor: float) -> torch.Tensor:
    """factor * up @ down for linear (out, r) x (r, in) or conv weights (out, r, 1, 1) x (r, in, k, k)."""
    if down.ndim == 2:
        return factor * (up @ down)
    flat = up.flatten(1) @ down.flatten(1)
    return factor * flat.reshape(up.shape[0], down.shape[1], *down.shape[2:])


def set_adapter_scales(model: nn.Module, scales: dict[str, float]) -> None:
    """Activate exactly the adapters in `scales`, each at scale * alpha / r (peft `set_scale`); all frozen."""
    for _, layer in adapter_layers(model):
        held = layer_adapter_names(layer)
        present = [n for n in scales if n in held]
        for name in present:
            layer.set_scale(name, float(scales[name]))
        layer.set_adapter(present)
    # peft's set_adapter marks active adapters trainable; inference adapters stay frozen.
    for name, param in model.named_parameters():
        if is_lora_parameter(name) or DECOMPOSED_ATTR in name:
            param.requires_grad_(False)


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete one adapter from every layer that holds it."""
    for _, layer in adapter_layers(model):
        if adapter_name in layer_adapter_names(layer):
            layer.delete_adapter(adapter_name)
        decomposed = getattr(layer, DECOMPOSED_ATTR, None)
        if decomposed is not None and adapter_name in decomposed:
            del decomposed[adapter_name]
        getattr(layer, LORA_ON_LOKR_ATTR, set()).discard(adapter_name)
