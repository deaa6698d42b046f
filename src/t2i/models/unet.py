"""Stable Diffusion UNet with CompVis `openaimodel` semantics and state-dict key names.

The network is a stack of `input_blocks` (ResBlocks, SpatialTransformers, Downsamples), a `middle_block`, and
`output_blocks` that concatenate the matching skip activation before each ResBlock. An original SD or SDXL single file
loads after stripping the `model.diffusion_model.` prefix.

SDXL is configuration of the same network: `transformer_depth` per level (0 = no transformer at that level),
`norm_num_groups`, and the ADM vector `y` (`num_classes: sequential`, `adm_in_channels`) whose embedding
`label_emb` is added to the time embedding. Keys and defaults come from `t2i.config.UNetConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from t2i.errors import InvalidInputError
from t2i.models.attention import CrossAttention, attention
from t2i.models.layers import (
    Downsample,
    Upsample,
    normalization,
    run_conditioned_layers,
    run_skip_levels,
    timestep_embedding,
    zero_module,
)
from t2i.models.unet_layout import (
    attention_heads,
    attention_levels,
    level_depths,
    middle_depth,
    resolve_unet_config,
    validate_unet_config,
)


def run_maybe_checkpointed(module: nn.Module, enabled: bool, fn: Callable[..., torch.Tensor], *args: Any):
    """Call fn(*args), recomputing activations in backward (non-reentrant) when enabled and training."""
    if enabled and module.training and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class ResBlock(nn.Module):
    """Residual block: GroupNorm-SiLU-conv, add the projected timestep embedding, GroupNorm-SiLU-dropout-conv.

    x: (B, C, H, W), emb: (B, E) -> (B, out_channels, H, W); a 1x1 conv skip when the channel count changes.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_checkpoint: bool = False,
        groups: int = 32,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels, groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels, groups),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return run_maybe_checkpointed(self, self.use_checkpoint, self._forward, x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class GEGLU(nn.Module):
    """Linear to 2*dim_out, then value * GELU(gate). (..., dim_in) -> (..., dim_out)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with a 4x hidden width; keys `net.0.proj`, `net.2`."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text context, and GEGLU feed-forward, each residual.

    x: (B, N, dim); context: (B, T, context_dim) | None (None: attn2 attends to x); context_mask: (B, T) | None.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_sdpa: bool = True,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout, use_sdpa)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout, use_sdpa)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return run_maybe_checkpointed(self, self.use_checkpoint, self._forward, x, context, context_mask)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None, context_mask: torch.Tensor | None):
        x = x + self.attn1(self.norm1(x))
        # A mask describes context tokens; without a context attn2 is self-attention and takes no mask.
        x = x + self.attn2(self.norm2(x), context, context_mask if context is not None else None)
        return x + self.ff(self.norm3(x))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is stored that way, else the default layout."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, with a residual around the whole stack.

    proj_in/proj_out are 1x1 convs (SD 1.x) or linears (SD 2.x, `use_linear`). (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        heads: int,
        dim_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_linear: bool = False,
        use_sdpa: bool = True,
        use_checkpoint: bool = False,
        groups: int = 32,
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = normalization(in_channels, groups, eps=1e-6)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner)
            self.proj_out: nn.Module = zero_module(nn.Linear(inner, in_channels))
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, 1)
            self.proj_out = zero_module(nn.Conv2d(inner, in_channels, 1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, dropout, context_dim, use_sdpa, use_checkpoint)
            for _ in range(depth)
        )

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        # (B, C, H, W) -> (B, HW, C); contiguous so the residual stream does not drag a strided view through
        # every LayerNorm (a no-op for channels_last input).
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1).contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context, context_mask)
        if self.use_linear:
            x = self.proj_out(x)
        # (B, HW, C) -> (B, C, H, W) in the layout of the input feature map.
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous(memory_format=_memory_format(x_in))
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class AttentionBlock(nn.Module):
    """Plain spatial self-attention (`use_spatial_transformer: false`), openaimodel legacy q/k/v layout.

    The fused `qkv` 1x1 conv output is split per head first, then into q, k, v. (B, C, H, W) -> same.
    """

    def __init__(
        self, channels: int, heads: int, use_sdpa: bool = True, use_checkpoint: bool = False, groups: int = 32
    ):
        super().__init__()
        self.heads = heads
        self.use_sdpa = use_sdpa
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels, groups)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_maybe_checkpointed(self, self.use_checkpoint, self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))  # (B, 3C, N)
        qkv = qkv.reshape(b, self.heads, 3 * c // self.heads, h * w).transpose(-1, -2)  # (B, H, N, 3d)
        q, k, v = qkv.chunk(3, dim=-1)
        out = attention(q, k, v, use_sdpa=self.use_sdpa)  # (B, H, N, d)
        out = out.transpose(-1, -2).reshape(b, c, h * w)
        return x + self.proj_out(out).reshape(b, c, h, w)


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to ResBlocks and the context to transformers."""

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return run_conditioned_layers(self, x, emb, context, context_mask, (ResBlock,), (SpatialTransformer,))


class UNetModel(nn.Module):
    """The SD / SDXL denoising UNet. Takes the NeMo/sgm `unet_config` keys of `t2i.config.UNetConfig` (its
    defaults apply to keys left out); see docs/CONTRACTS.md for forward().

    `attention_resolutions` lists downsampling factors (1, 2, 4, ...) whose levels get attention;
    `transformer_depth` (an int or one per level) sets the SpatialTransformer depth there, 0 meaning none.
    `num_classes: sequential` adds `label_emb`, an MLP from the ADM vector y (B, adm_in_channels) to the time
    embedding width. `use_flash_attention` routes attention through torch SDPA; `use_checkpoint` recomputes
    block activations in backward while training. `image_size` is accepted for config compatibility and unused.
    """

    def __init__(self, **unet_config: Any):
        super().__init__()
        c = resolve_unet_config(unet_config)
        validate_unet_config(c)
        self.unet_config: dict[str, Any] = c
        self.in_channels = c["in_channels"]
        self.out_channels = c["out_channels"]
        self.model_channels = mc = c["model_channels"]
        self.attention_resolutions = c["attention_resolutions"]
        self.num_res_blocks = c["num_res_blocks"]
        self.channel_mult = c["channel_mult"]
        self.use_checkpoint = c["use_checkpoint"]
        self.groups = c["norm_num_groups"]
        self.depths = level_depths(c)
        self.has_attention = attention_levels(c)
        time_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.label_emb = None if c["num_classes"] is None else adm_embedding(c["adm_in_channels"], time_dim)
        skip_channels = self._build_input_blocks(time_dim)
        ch = self.channel_mult[-1] * mc
        self.middle_block = TimestepEmbedSequential(
            self._res_block(ch, ch, time_dim),
            self._attention_layer(ch, middle_depth(c)),
            self._res_block(ch, ch, time_dim),
        )
        self._build_output_blocks(time_dim, skip_channels)
        self.out = nn.Sequential(
            normalization(mc, self.groups),
            nn.SiLU(),
            zero_module(nn.Conv2d(mc, self.out_channels, 3, padding=1)),
        )

    def _res_block(self, channels: int, out_channels: int, time_dim: int) -> ResBlock:
        c = self.unet_config
        return ResBlock(channels, time_dim, c["dropout"], out_channels, self.use_checkpoint, self.groups)

    def _attention_layer(self, ch: int, depth: int) -> nn.Module:
        """The attention at a site with `ch` channels: a SpatialTransformer of `depth` blocks (Identity for
        depth 0, which only the middle block asks for), or openaimodel's plain AttentionBlock."""
        c = self.unet_config
        spatial = c["use_spatial_transformer"]
        heads, dim_head = attention_heads(ch, c["num_heads"], c["num_head_channels"], c["legacy"], spatial)
        if not spatial:
            heads = heads if dim_head == -1 else ch // dim_head
            return AttentionBlock(ch, heads, c["use_flash_attention"], self.use_checkpoint, self.groups)
        if depth == 0:
            return nn.Identity()  # keeps middle_block.2 at index 2, as sgm's disable_middle_transformer does
        return SpatialTransformer(
            ch,
            heads,
            dim_head,
            depth,
            c["dropout"],
            c["context_dim"],
            c["use_linear_in_transformer"],
            c["use_flash_attention"],
            self.use_checkpoint,
            self.groups,
        )

    def _build_input_blocks(self, time_dim: int) -> list[int]:
        """Build `input_blocks`; return the channel count of every skip activation in push order."""
        mc = self.model_channels
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(self.in_channels, mc, 3, padding=1))]
        )
        skip_channels, ch = [mc], mc
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers: list[nn.Module] = [self._res_block(ch, mult * mc, time_dim)]
                ch = mult * mc
                if self.has_attention[level]:
                    layers.append(self._attention_layer(ch, self.depths[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, True, ch)))
                skip_channels.append(ch)
        return skip_channels

    def _build_output_blocks(self, time_dim: int, skip_channels: list[int]) -> None:
        mc = self.model_channels
        self.output_blocks = nn.ModuleList()
        ch = self.channel_mult[-1] * mc
        skip_channels = list(skip_channels)
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                layers: list[nn.Module] = [self._res_block(ch + skip_channels.pop(), mc * mult, time_dim)]
                ch = mc * mult
                if self.has_attention[level]:
                    layers.append(self._attention_layer(ch, self.depths[level]))
                if level and i == self.num_res_blocks:
                    layers.append(Upsample(ch, True, ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, in_channels, H, W) with H, W divisible by 2**(levels-1); timesteps: (B,) or scalar;
        context: (B, T, context_dim) | None; context_mask: (B, T) bool, True = real token | None;
        y: (B, adm_in_channels), required exactly when num_classes is set. Returns (B, out_channels, H, W)."""
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        param_dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(param_dtype))
        emb = self._add_label_embedding(emb, y, x.shape[0])
        if context is not None:
            context = context.to(param_dtype)
        h = run_skip_levels(self.input_blocks, self.middle_block, self.output_blocks, x.to(param_dtype), emb,
                            context, context_mask)  # fmt: skip
        return self.out(h)

    def _add_label_embedding(self, emb: torch.Tensor, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        """emb + label_emb(y) for an ADM UNet; InvalidInputError when y is missing, unexpected or misshaped."""
        if self.label_emb is None:
            if y is not None:
                raise InvalidInputError("y: given, but unet_config.num_classes is null; pass y=None")
            return emb
        expected = (batch, self.unet_config["adm_in_channels"])
        if y is None or tuple(y.shape) != expected:
            got = "missing" if y is None else f"shape {tuple(y.shape)}"
            raise InvalidInputError(
                f"y: {got}; this UNet (num_classes: sequential) needs y of shape {expected}"
            )
        return emb + self.label_emb(y.to(emb.dtype))


def adm_embedding(adm_in_channels: int, time_dim: int) -> nn.Sequential:
    """sgm's `label_emb` for `num_classes: sequential`: Sequential(Sequential(Linear, SiLU, Linear)), keys
    `label_emb.0.0` / `label_emb.0.2` (diffusers' `add_embedding.linear_1` / `linear_2`)."""
    mlp = nn.Sequential(nn.Linear(adm_in_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
    return nn.Sequential(mlp)
