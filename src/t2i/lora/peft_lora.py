"""LoRA adapters on a backbone through `peft`: which modules get one, injecting them, and reading them back.

A LoRA replaces a linear (or conv) `W x` by `W x + scale * (alpha / r) * B A x`, with A (r, in) and
B (out, r) the only trained weights (Hu et al. 2021, eq. 3). `peft` wraps each targeted module in a `LoraLayer`
that holds several named adapters; this file only decides the targets and reads the layers.

Targets are resolved to full module paths here (not peft suffixes), because the Imagen blocks reuse the name
`proj_out` for attention outputs, feed-forward outputs and 1x1 convs alike.
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


def lora_layer_types() -> tuple[type, ...]:
    from peft.tuners.lora import LoraLayer

    return (LoraLayer,)


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
    return isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d, *lora_layer_types()))


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
        if isinstance(child, (*kinds, *lora_layer_types())):
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
        if name and is_adaptable(m) and ".base_layer" not in name and ".lora_" not in name
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


def _exact(path: str) -> str:
    return re.escape(path)


def inject_lora(
    model: nn.Module,
    targets: Sequence[str],
    rank: int | dict[str, int],
    alpha: float | dict[str, float] | None = None,
    dropout: float = 0.0,
    adapter_name: str = DEFAULT_ADAPTER,
) -> nn.Module:
    """Add adapter `adapter_name` to the modules at `targets` (full paths) with peft `inject_adapter_in_model`.

    `rank`/`alpha` are one value or one per path (alpha None = rank, i.e. scale 1). lora_A is Kaiming-random
    and lora_B zero, so the model's output is unchanged until training. Base weights are frozen.
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(targets)
    if not targets:
        raise LoraError("lora: no target modules given")
    ranks = rank if isinstance(rank, dict) else dict.fromkeys(targets, int(rank))
    alphas = alpha if isinstance(alpha, dict) else dict.fromkeys(targets, alpha)
    alphas = {t: float(ranks[t] if alphas.get(t) is None else alphas[t]) for t in targets}
    r = Counter(ranks[t] for t in targets).most_common(1)[0][0]
    a = Counter(alphas[t] for t in targets).most_common(1)[0][0]
    config = LoraConfig(
        r=r,
        lora_alpha=a,
        lora_dropout=float(dropout),
        target_modules=targets,
        rank_pattern={_exact(t): ranks[t] for t in targets if ranks[t] != r},
        alpha_pattern={_exact(t): alphas[t] for t in targets if alphas[t] != a},
    )
    with warnings.catch_warnings():
        # a second adapter on the same model is intended (several LoRAs at once)
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_parameter(name, adapter_name))
    return model


def apply_lora(
    model: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
) -> list[str]:
    """Give `model` a trainable LoRA on `target_modules` (see `resolve_targets`); returns the adapted paths.

    Only the new lora_A / lora_B weights require grad afterwards.
    """
    if not isinstance(rank, int) or rank < 1:
        raise LoraError(f"model.lora.rank: {rank!r}; expected an integer >= 1")
    targets = resolve_targets(model, target_modules)
    inject_lora(model, targets, rank, alpha, dropout, adapter_name)
    return targets


def is_lora_parameter(name: str, adapter_name: str | None = None) -> bool:
    """Whether a parameter name (from named_parameters) is a lora_A/lora_B weight (of `adapter_name`)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("lora_A", "lora_B") and (adapter_name is None or parts[i + 1] == adapter_name):
            return True
    return False


def lora_parameters(model: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The lora_A / lora_B parameters of `model` (of one adapter, or all)."""
    return [p for n, p in model.named_parameters() if is_lora_parameter(n, adapter_name)]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, peft LoraLayer) for every adapted module, path as in the un-adapted model."""
    for name, module in model.named_modules():
        if isinstance(module, lora_layer_types()):
            yield name, module


@contextlib.contextmanager
def adapters_disabled(*models: nn.Module) -> Iterator[None]:
    """Run `models` as their base alone: every LoRA layer bypassed inside the block, restored after."""
    layers = [layer for model in models for _, layer in lora_layers(model)]
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
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.lora_A.keys()))
    return list(names)


def lora_weights(
    model: nn.Module, adapter_name: str = DEFAULT_ADAPTER
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module path: (A (r, in, ...), B (out, r, ...), alpha / r)} of one adapter."""
    out = {}
    for path, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            ratio = float(layer.lora_alpha[adapter_name]) / float(layer.r[adapter_name])
            out[path] = (layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight, ratio)
    return out


def delta_weight(down: torch.Tensor, up: torch.Tensor, factor: float) -> torch.Tensor:
    """factor * up @ down for linear (out, r) x (r, in) or conv weights (out, r, 1, 1) x (r, in, k, k)."""
    if down.ndim == 2:
        return factor * (up @ down)
    flat = up.flatten(1) @ down.flatten(1)
    return factor * flat.reshape(up.shape[0], down.shape[1], *down.shape[2:])


def set_adapter_scales(model: nn.Module, scales: dict[str, float]) -> None:
    """Activate exactly the adapters in `scales`, each at scale * alpha / r (peft `set_scale`); all frozen."""
    for _, layer in lora_layers(model):
        present = [n for n in scales if n in layer.lora_A]
        for name in present:
            layer.set_scale(name, float(scales[name]))
        layer.set_adapter(present)
    # peft's set_adapter marks active adapters trainable; inference adapters stay frozen.
    for name, param in model.named_parameters():
        if is_lora_parameter(name):
            param.requires_grad_(False)


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete one adapter from every layer that holds it."""
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)
