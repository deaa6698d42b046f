"""Building blocks shared by the Imagen Regular UNet and Efficient UNet (NeMo MegatronImagen semantics).

Time embeddings, the text conditioner (projection, pooling, null token), residual blocks and the four attention
kinds: `self`, `cross`, `stacked` (self then cross then a GEGLU feed-forward) and `fused` (one attention whose
keys/values are the image tokens concatenated with the text tokens).

Where we differ from NeMo on purpose:
- the text context is normalised per token with LayerNorm (NeMo uses GroupNorm over the token axis, which lets
  padding tokens leak into real ones); the parameter count is the same.
- feature pooling (mean or attention) ignores padding tokens (NeMo pools over all of them).
- NeMo's Regular UNet offers only `stacked` and `fused`; here every UNet takes all four kinds.
- a query row with no real key (cross attention on an all-padding text) yields zero, as NeMo's nan_to_num does.
- `stable_attention` is a forward-pass reformulation (q and k each scaled by d^-1/4, float32 softmax), not
  NeMo's custom backward that rescales the gradient; `flash_attention` uses torch's SDPA and takes precedence.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from t2i.errors import ConfigError, InvalidInputError
from t2i.models.attention import attention as sdpa_attention
from t2i.models.layers import timestep_embedding

ATTENTION_TYPES = ("self", "cross", "stacked", "fused")
POOLING_TYPES = ("attention", "mean")


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are taken in float32 for half-precision inputs, cast back after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            return super().forward(x.float()).to(x.dtype)
        return super().forward(x)


def group_norm(channels: int) -> GroupNorm32:
    """GroupNorm with 32 groups (fewer when `channels` is not a multiple of 32, for tiny test models)."""
    return GroupNorm32(math.gcd(32, channels), channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a module's parameters so a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


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


# ----------------------------------------------------------------------------------------------- embeddings
class SinusoidalEmbedding(nn.Module):
    """Fixed sinusoidal embedding of a scalar (cos half first). (B,) -> (B, dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim)


class LearnedSinusoidalEmbedding(nn.Module):
    """Learned-frequency Fourier features (crowsonkb v-diffusion): [t, sin(2 pi w t), cos(2 pi w t)].

    (B,) -> (B, dim + 1).
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ConfigError(f"model.unet.learned_sinu_pos_emb_dim: {dim} must be even")
        self.weights = nn.Parameter(torch.randn(dim // 2))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()[:, None]
        angles = t * self.weights[None, :].float() * (2 * math.pi)
        return torch.cat([t, angles.sin(), angles.cos()], dim=-1)


class ScalarEmbedding(nn.Module):
    """Scalar -> sinusoidal features -> Linear -> SiLU -> Linear. (B,) -> (B, out_dim).

    learned_dim = 0 uses fixed sinusoids of width `embed_dim`; > 0 learned ones of width learned_dim + 1.
    """

    def __init__(self, embed_dim: int, learned_dim: int, out_dim: int):
        super().__init__()
        if learned_dim < 0:
            raise ConfigError(
                f"model.unet.learned_sinu_pos_emb_dim: {learned_dim}; expected 0 or a positive size"
            )
        if learned_dim > 0:
            self.features: nn.Module = LearnedSinusoidalEmbedding(learned_dim)
            width = learned_dim + 1
        else:
            self.features, width = SinusoidalEmbedding(embed_dim), embed_dim
        self.linear_1 = nn.Linear(width, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.features(t).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(h)))


# ------------------------------------------------------------------------------------------ text conditioning
def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens. tokens (B, T, D), mask (B, T) bool -> (B, D); zero for an all-padding row."""
    weights = mask.to(tokens.dtype)[..., None]
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class AttentionPooling(nn.Module):
    """Self-attention pooling (Safari et al. 2020): softmax over tokens of a learned score, padding excluded.

    tokens (B, T, D), mask (B, T) bool -> (B, D); zero for an all-padding row.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.W = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        wide = torch.promote_types(tokens.dtype, torch.float32)
        scores = self.W(tokens).squeeze(-1).to(wide).masked_fill(~mask, float("-inf"))  # (B, T)
        weights = scores.softmax(dim=1).nan_to_num(0.0).to(tokens.dtype)
        return (tokens * weights[..., None]).sum(dim=1)


class TextConditioner(nn.Module):
    """Turns T5-style token embeddings into (attention context, context mask, vector added to the time cond).

    text_embed (B, T, text_embed_dim), text_mask (B, T) bool -> context (B, T', cond_dim), mask (B, T'),
    hidden (B, time_embed_dim); T' = T + 1 with the learned null token appended (`use_null_token`).
    """

    def __init__(
        self, text_embed_dim: int, cond_dim: int, time_embed_dim: int, pooling: str, use_null_token: bool
    ):
        super().__init__()
        self.text_embed_dim = text_embed_dim
        self.pooling = pooling
        if pooling == "attention":
            self.attention_pooling = AttentionPooling(text_embed_dim)
            self.pool_proj = nn.Sequential(nn.LayerNorm(text_embed_dim), nn.Linear(text_embed_dim, cond_dim))
        self.text_to_cond = nn.Linear(text_embed_dim, cond_dim)
        self.to_text_non_attn_cond = nn.Sequential(
            nn.LayerNorm(cond_dim),
            nn.Linear(cond_dim, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        self.null_text_embedding = nn.Parameter(torch.randn(1, 1, cond_dim)) if use_null_token else None

    def forward(
        self, text_embed: torch.Tensor | None, text_mask: torch.Tensor | None, batch: int, ref: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if text_embed is None:
            # unconditional: one all-padding token, so only the null token (if any) is attended to
            text_embed = ref.new_zeros(batch, 1, self.text_embed_dim)
            text_mask = torch.zeros(batch, 1, dtype=torch.bool, device=ref.device)
        elif text_mask is None:
            text_mask = torch.ones(text_embed.shape[:2], dtype=torch.bool, device=text_embed.device)
        text_mask = text_mask.bool()
        text_embed = text_embed.to(self.text_to_cond.weight.dtype)
        context = self.text_to_cond(text_embed)
        if self.pooling == "attention":
            pooled = self.pool_proj(self.attention_pooling(text_embed, text_mask))
        else:
            pooled = masked_mean(context, text_mask)
        hidden = self.to_text_non_attn_cond(pooled)
        if self.null_text_embedding is not None:
            null = self.null_text_embedding.to(context.dtype).expand(context.shape[0], 1, -1)
            context = torch.cat([context, null], dim=1)
            text_mask = F.pad(text_mask, (0, 1), value=True)
        return context, text_mask, hidden


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


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, h*d) -> (B, h, N, d)."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, h, N, d) -> (B, N, h*d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


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
            _split(q, h), _split(k, h), _split(v, h), mask, stable=self.stable, flash=self.flash
        )
        return _merge(out)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, context, mask, enabled=self.checkpointing)

    def _forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SelfAttentionBlock(AttentionBlockBase):
    """x + proj_out(SelfAttention(GroupNorm(x))). The text is ignored. (B, C, H, W) -> same."""

    def __init__(self, channels: int, heads: int, stable: bool, flash: bool, checkpointing: bool):
        super().__init__(channels, heads, stable, flash, checkpointing)
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_init(nn.Linear(channels, channels))

    def _forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(_tokens(self.norm(x))).chunk(3, dim=-1)
        return x + _image(self.proj_out(self.attend(q, k, v, None)), x)


class CrossAttentionBlock(AttentionBlockBase):
    """x + proj_out(Attention(q = GroupNorm(x), k/v = LayerNorm(text))). (B, C, H, W) -> same."""

    def __init__(
        self, channels: int, context_dim: int, heads: int, stable: bool, flash: bool, checkpointing: bool
    ):
        super().__init__(channels, heads, stable, flash, checkpointing)
        self.norm = group_norm(channels)
        self.norm_context = nn.LayerNorm(context_dim)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj_out = zero_init(nn.Linear(channels, channels))

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
        self.norm = group_norm(channels)
        self.norm_self = group_norm(channels)
        self.norm_context = nn.LayerNorm(context_dim)
        self.q = nn.Linear(channels, channels)
        self.kv_self = nn.Linear(channels, 2 * channels)
        self.kv_context = nn.Linear(context_dim, 2 * channels)
        self.proj_out = zero_init(nn.Linear(channels, channels))

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
        self.norm = group_norm(channels)
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
        self.norm = group_norm(channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.self_attention = SelfAttentionBlock(channels, heads, stable, flash, False)
        self.cross_attention = CrossAttentionBlock(channels, context_dim, heads, stable, flash, False)
        self.ff = GEGLUFeedForward(channels)
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))

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


# ------------------------------------------------------------------------------------------ residual blocks
class ResBlock(nn.Module):
    """ADM residual block, optionally resampling (`up`/`down`, for resblock_updown) between norm and conv.

    x (B, C, H, W), emb (B, E) -> (B, out_channels, H', W'). With scale_shift_norm the embedding gives
    (scale, shift) applied after the second norm, else it is added before it.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        scale_shift_norm: bool = True,
        up: bool = False,
        down: bool = False,
        checkpointing: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.scale_shift_norm, self.checkpointing = scale_shift_norm, checkpointing
        self.in_norm = group_norm(channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.resample: nn.Module = nn.Identity()
        if up:
            self.resample = nn.Upsample(scale_factor=2, mode="nearest")
        elif down:
            self.resample = nn.AvgPool2d(2)
        self.emb_proj = nn.Linear(emb_channels, (2 if scale_shift_norm else 1) * out_channels)
        self.out_norm = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, emb, enabled=self.checkpointing)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(self.resample(F.silu(self.in_norm(x))))
        h = modulate(self.out_norm, h, self.emb_proj(F.silu(emb)), self.scale_shift_norm)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(self.resample(x)) + h


def modulate(norm: nn.Module, h: torch.Tensor, emb_out: torch.Tensor, scale_shift: bool) -> torch.Tensor:
    """norm(h) * (1 + scale) + shift when scale_shift, else norm(h + emb). emb_out (B, 2C or C)."""
    emb_out = emb_out[:, :, None, None].to(h.dtype)
    if scale_shift:
        scale, shift = emb_out.chunk(2, dim=1)
        return norm(h) * (1 + scale) + shift
    return norm(h + emb_out)


class EfficientResBlock(nn.Module):
    """Imagen Fig. A.27 residual block: always a 1x1 shortcut, scaled by 1/sqrt(2) with skip scaling.

    x (B, C, H, W), emb (B, E) -> (B, out_channels, H, W).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        scale_shift_norm: bool = True,
        skip_scaling: bool = False,
        checkpointing: bool = False,
    ):
        super().__init__()
        self.scale_shift_norm, self.checkpointing = scale_shift_norm, checkpointing
        self.in_norm = group_norm(channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, (2 if scale_shift_norm else 1) * out_channels)
        self.out_norm = group_norm(out_channels)
        self.out_conv = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.shortcut = nn.Conv2d(channels, out_channels, 1)
        self.shortcut_scale = 2**-0.5 if skip_scaling else 1.0

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, emb, enabled=self.checkpointing)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(F.silu(self.in_norm(x)))
        h = modulate(self.out_norm, h, self.emb_proj(F.silu(emb)), self.scale_shift_norm)
        h = self.out_conv(F.silu(h))
        return h + self.shortcut(x) * self.shortcut_scale


class CondSequential(nn.ModuleList):
    """Runs its layers in order, giving each what it takes: ResBlocks get emb, attention gets the text."""

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, (ResBlock, EfficientResBlock)):
                x = layer(x, emb)
            elif isinstance(layer, AttentionBlockBase):
                x = layer(x, context, mask)
            else:
                x = layer(x)
        return x


# ------------------------------------------------------------------------------------------------ UNet base
class ImagenUNetBase(nn.Module):
    """What the Regular and Efficient UNets share: the conditioning modules and the forward contract.

    forward(x (B, channels, H, W), time_cond (B,), text_embed (B, T, text_embed_dim) | None,
    text_mask (B, T) bool | None, x_low_res (B, channels, h, w) | None, aug_cond (B,) | None) -> (B, channels, H, W)
    checks the optional inputs, concatenates x_low_res, builds the conditioning vector
    MLP(time_cond) [+ MLP(aug_cond)] + MLP(pooled text) and hands over to the subclass's `_forward_layers`.

    A subclass calls `_build_conditioning` in its __init__ and sets `low_res_cond` (x_low_res required),
    `_low_res_flag` (the setting named when x_low_res is missing or unexpected) and `_total_downsampling`.
    """

    low_res_cond: bool
    noise_cond_aug: bool
    _low_res_flag: str
    _total_downsampling: int

    def _build_conditioning(
        self,
        embed_dim: int,
        learned_sinu_pos_emb_dim: int,
        text_embed_dim: int,
        cond_dim: int,
        feature_pooling_type: str,
        use_null_token: bool,
        noise_cond_aug: bool,
    ) -> int:
        """Register `time_embed`, `lowres_time_embed` (None without noise_cond_aug) and `text`; return the
        width of the conditioning vector."""
        self.noise_cond_aug = noise_cond_aug
        time_dim = 4 * embed_dim
        self.time_embed = ScalarEmbedding(embed_dim, learned_sinu_pos_emb_dim, time_dim)
        self.lowres_time_embed = (
            ScalarEmbedding(embed_dim, learned_sinu_pos_emb_dim, time_dim) if noise_cond_aug else None
        )
        pooling = check_choice("feature_pooling_type", feature_pooling_type, POOLING_TYPES)
        self.text = TextConditioner(text_embed_dim, cond_dim, time_dim, pooling, use_null_token)
        return time_dim

    def forward(
        self,
        x: torch.Tensor,
        time_cond: torch.Tensor,
        text_embed: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        x_low_res: torch.Tensor | None = None,
        aug_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_optional_input("x_low_res", x_low_res, self.low_res_cond, self._low_res_flag)
        check_optional_input("aug_cond", aug_cond, self.noise_cond_aug, "model.unet.noise_cond_aug")
        check_divisible(x, self._total_downsampling)
        if x_low_res is not None:
            x = concat_low_res(x, x_low_res)
        emb = self.time_embed(time_cond)
        if self.lowres_time_embed is not None:
            emb = emb + self.lowres_time_embed(aug_cond)
        context, mask, text_hidden = self.text(text_embed, text_mask, x.shape[0], x)
        return self._forward_layers(x, emb + text_hidden, context, mask)

    def _forward_layers(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The UNet proper on x (B, in_channels, H, W), with x_low_res already concatenated."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------- inputs and checks
def concat_low_res(x: torch.Tensor, x_low_res: torch.Tensor) -> torch.Tensor:
    """Channel-concatenate the low-resolution conditioning image, bicubic-upsampling it to x's size if needed.

    x (B, C, H, W), x_low_res (B, C, h, w) -> (B, 2C, H, W). Callers may upsample beforehand (the cascade does);
    a size mismatch is resolved here so either way works.
    """
    if x_low_res.shape[-2:] != x.shape[-2:]:
        x_low_res = F.interpolate(x_low_res.float(), size=x.shape[-2:], mode="bicubic", align_corners=False)
    return torch.cat([x, x_low_res.to(x.dtype)], dim=1)


def check_divisible(x: torch.Tensor, factor: int) -> None:
    """InvalidInputError unless H and W of x (B, C, H, W) are multiples of the UNet's total downsampling."""
    if x.shape[-2] % factor or x.shape[-1] % factor:
        raise InvalidInputError(f"x: size {tuple(x.shape[-2:])} must be a multiple of {factor} in H and W")


def check_optional_input(name: str, value: torch.Tensor | None, expected: bool, flag: str) -> None:
    """InvalidInputError when an input is missing although `flag` is on, or given although it is off."""
    if expected and value is None:
        raise InvalidInputError(f"{name}: missing, but {flag} needs it")
    if not expected and value is not None:
        raise InvalidInputError(f"{name}: given, but {flag} is off; pass None")


# ------------------------------------------------------------------------------------------ config checking
def signature_keys(cls: type) -> list[str]:
    """The keyword arguments a UNet class accepts (its `model.unet` keys), in signature order."""
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]


def reject_unknown_keys(unknown: dict, cls: type) -> None:
    """Raise ConfigError naming the first unknown `model.unet` key and listing the valid ones."""
    if unknown:
        valid = signature_keys(cls)
        key = min(unknown)
        raise ConfigError(f"model.unet.{key}: unknown key; valid keys: {', '.join(valid)}")


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> str:
    """Return value if it is one of choices, else raise ConfigError naming model.unet.<key>."""
    if value not in choices:
        raise ConfigError(f"model.unet.{key}: {value!r} is not one of {', '.join(choices)}")
    return value


def per_level(key: str, value: int | Sequence[int], levels: int) -> list[int]:
    """An int repeated per UNet level, or a list that must have one entry per level."""
    if isinstance(value, int):
        return [value] * levels
    values = [int(v) for v in value]
    if len(values) != levels:
        raise ConfigError(
            f"model.unet.{key}: {values} has {len(values)} entries; expected one per level ({levels})"
        )
    return values


def dropout_rate(value: bool | float) -> float:
    """NeMo writes `dropout: False`; accept False/0 and floats in [0, 1)."""
    rate = 0.0 if value is False else float(value)
    if value is True or not 0.0 <= rate < 1.0:
        raise ConfigError(f"model.unet.dropout: {value!r}; expected False or a rate in [0, 1)")
    return rate
