"""Imagen attention kinds (NeMo MegatronImagen semantics) over a feature map, conditioned on text tokens.

`self`, `cross`, `stacked` (self then cross then a GEGLU feed-forward) and `fused` (one attention whose
keys/values are the image tokens concatenated with the text tokens). Padding keys are masked out; a query row
with no real key yields zero (NeMo's nan_to_num). `stable_attention` is a forward-pass reformulation (q and k
each scaled by d^-1/4, float32 softmax); `flash_attention` uses torch's SDPA and takes precedence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from t2i.errors import ConfigError
from t2i.models.attention import attention as sdpa_attention
from t2i.models.attention import merge_heads, split_heads
from t2i.models.layers import fitted_normalization, zero_module

ATTENTION_TYPES = ("self", "cross", "stacked", "fused")


def maybe_checkpoint(fn, *args: torch.Tensor | None, enabled: bool) -> torch.Tensor:
    """Run fn(*args), recomputing activations in backward when `enabled` and autograd is recording."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def heads_for(channels: int, num_heads: int, head_channels: int) -> int:
    """NeMo's rule: `channels // head_channels` heads when head_channels > 0, else `num_heads` heads."""
    if head_channels > 0:
        if channels % head_channels:
            raise ConfigError(
                f"model.unet.per_head_channels: {head_channels} does not divide attention width {channels}"
            )
        return channels // head_channels
    if channels % num_heads:
        raise ConfigError(
            f"model.unet.num_attn_heads: {num_heads} does not divide attention width {channels}"
        )
    return num_heads


# ------------------------------------------------------------------------------------------- attention core
def attention_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    *,
    stable: bool,
    flash: bool,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with padding keys masked out.

    q (B, h, N, d); k, v (B, h, M, d); key_mask (B, M) bool, True = real key, or None.
    `flash` goes through torch's scaled_dot_product_attention; `stable` scales q and k by d^-1/4 each and takes
    the softmax in float32; otherwise plain math in the input dtype. All three are the same function.
    A batch row without any real key returns zeros. Returns (B, h, N, d).
    """
    has_key = None
    if key_mask is not None:
        has_key = key_mask.any(dim=1)  # (B,)
        key_mask = key_mask | ~has_key[:, None]  # avoid an all -inf row; its output is zeroed below
    if flash:
        out = sdpa_attention(q, k, v, mask=key_mask, use_sdpa=True)
    else:
        out = _explicit_attention(q, k, v, key_mask, stable)
    if has_key is not None:
        out = out * has_key[:, None, None, None].to(out.dtype)
    return out


def _explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, stable: bool
) -> torch.Tensor:
    d = q.shape[-1]
    if stable:
        scale = d**-0.25  # scaling both factors keeps the product's magnitude safe in fp16/bf16
        wide = torch.promote_types(q.dtype, torch.float32)
        scores = torch.matmul((q * scale).to(wide), (k * scale).to(wide).transpose(-1, -2))
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)) * d**-0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    weights = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(weights, v)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, HW, C)."""
    return x.flatten(2).transpose(1, 2)


def _image(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, HW, C) -> (B, C, H, W) shaped like `like`."""
    return tokens.transpose(1, 2).reshape(like.shape)


# ---------------------------------------------------------------------------------------- attention blocks
class AttentionBlockBase(nn.Module):
    """Common settings: heads, stable/flash switches, gradient checkpointing. forward(x, context, mask) -> x."""

    def __init__(self, channels: int, heads: int, stable: bool, flash: bool, checkpointing: bool):
        super().__init__()
        self.heads, self.stable, self.flash, self.checkpointing = heads, stable, flash, checkpointing

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """q (B, N, C), k/v (B, M, C) -> (B, N, C)."""
        h = self.heads
        out = attention_core(
            split_heads(q, h),
            split_heads(k, h),
            split_heads(v, h),
            mask,
            stable=self.stable,
            flash=self.flash,
        )
        return merge_heads(out)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, context, mask, enabled=self.checkpointing)

    def _forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SelfAttentionBlock(AttentionBlockBase):
    """x + proj_out(SelfAttention(GroupNorm(x))). The text is ignored. (B, C, H, W) -> same."""

    def __init__(self, channels: int, heads: int, stable: bool, flash: bool, checkpointing: bool):
        super().__init__(channels, heads, stable, flash, checkpointing)
        self.norm = fitted_normalization(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def _forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(_tokens(self.norm(x))).chunk(3, dim=-1)
        return x + _image(self.proj_out(self.attend(q, k, v, None)), x)


class CrossAttentionBlock(AttentionBlockBase):
    """x + proj_out(Attention(q = GroupNorm(x), k/v = LayerNorm(text))). (B, C, H, W) -> same."""

    def __init__(
        self, channels: int, context_dim: int, heads: int, stable: bool, flash: bool, checkpointing: bool
    ):
        super().__init__(channels, heads, stable, flash, checkpointing)
        self.norm = fitted_normalization(channels)
        self.norm_context = nn.LayerNorm(context_dim)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def _forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.q(_tokens(self.norm(x)))
        k, v = self.kv(self.norm_context(context)).chunk(2, dim=-1)
        return x + _image(self.proj_out(self.attend(q, k, v, mask)), x)


class FusedAttentionBlock(AttentionBlockBase):
    """One attention whose keys/values are [image tokens; text tokens] (Imagen's base64/SR256 block).

    (B, C, H, W), context (B, T, D), mask (B, T) -> (B, C, H, W).
    """

    def __init__(
        self, channels: int, context_dim: int, heads: int, stable: bool, flash: bool, checkpointing: bool
    ):
        super().__init__(channels, heads, stable, flash, checkpointing)
        self.norm = fitted_normalization(channels)
        self.norm_self = fitted_normalization(channels)
        self.norm_context = nn.LayerNorm(context_dim)
        self.q = nn.Linear(channels, channels)
        self.kv_self = nn.Linear(channels, 2 * channels)
        self.kv_context = nn.Linear(context_dim, 2 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def _forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.q(_tokens(self.norm(x)))
        k_self, v_self = self.kv_self(_tokens(self.norm_self(x))).chunk(2, dim=-1)
        k_text, v_text = self.kv_context(self.norm_context(context)).chunk(2, dim=-1)
        k, v = torch.cat([k_self, k_text], dim=1), torch.cat([v_self, v_text], dim=1)
        image_mask = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
        out = self.attend(q, k, v, torch.cat([image_mask, mask], dim=1))
        return x + _image(self.proj_out(out), x)


class GEGLUFeedForward(nn.Module):
    """x + W2 (a * gelu(g)), [a, g] = W1 GroupNorm(x), inner width 4C. (B, C, H, W) -> same."""

    def __init__(self, channels: int, mult: int = 4):
        super().__init__()
        self.norm = fitted_normalization(channels)
        self.proj_in = nn.Linear(channels, 2 * mult * channels)
        self.proj_out = nn.Linear(mult * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj_in(_tokens(self.norm(x))).chunk(2, dim=-1)
        return x + _image(self.proj_out(a * F.gelu(gate)), x)


class StackedAttentionBlock(AttentionBlockBase):
    """x + proj_out(FF(Cross(Self(proj_in(GroupNorm(x)))))), as NeMo's StackedCrossAttentionBlock."""

    def __init__(
        self, channels: int, context_dim: int, heads: int, stable: bool, flash: bool, checkpointing: bool
    ):
        super().__init__(channels, heads, stable, flash, checkpointing)
        self.norm = fitted_normalization(channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.self_attention = SelfAttentionBlock(channels, heads, stable, flash, False)
        self.cross_attention = CrossAttentionBlock(channels, context_dim, heads, stable, flash, False)
        self.ff = GEGLUFeedForward(channels)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def _forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.self_attention(self.proj_in(self.norm(x)), context, mask)
        h = self.ff(self.cross_attention(h, context, mask))
        return x + self.proj_out(h)


def make_attention_block(
    kind: str,
    channels: int,
    context_dim: int,
    num_heads: int,
    head_channels: int,
    stable: bool,
    flash: bool,
    checkpointing: bool,
) -> AttentionBlockBase:
    """Build the attention block named by `attention_type` (self | cross | stacked | fused)."""
    if kind not in ATTENTION_TYPES:
        raise ConfigError(f"model.unet.attention_type: {kind!r} is not one of {', '.join(ATTENTION_TYPES)}")
    heads = heads_for(channels, num_heads, head_channels)
    if kind == "self":
        return SelfAttentionBlock(channels, heads, stable, flash, checkpointing)
    blocks = {"cross": CrossAttentionBlock, "stacked": StackedAttentionBlock, "fused": FusedAttentionBlock}
    return blocks[kind](channels, context_dim, heads, stable, flash, checkpointing)
