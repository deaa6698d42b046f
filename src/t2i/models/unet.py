"""Stable Diffusion UNet with CompVis `openaimodel` semantics and state-dict key names.

The network is a stack of `input_blocks` (ResBlocks, SpatialTransformers, Downsamples), a `middle_block`, and
`output_blocks` that concatenate the matching skip activation before each ResBlock. An original SD single file
loads after stripping the `model.diffusion_model.` prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from t2i.errors import ConfigError
from t2i.models.attention import CrossAttention, attention
from t2i.models.layers import Downsample, Upsample, normalization, timestep_embedding, zero_module


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
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
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
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = normalization(in_channels, eps=1e-6)
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

    def __init__(self, channels: int, heads: int, use_sdpa: bool = True, use_checkpoint: bool = False):
        super().__init__()
        self.heads = heads
        self.use_sdpa = use_sdpa
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
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
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_mask)
            else:
                x = layer(x)
        return x


UNET_CONFIG_KEYS = (
    "in_channels",
    "out_channels",
    "model_channels",
    "attention_resolutions",
    "num_res_blocks",
    "channel_mult",
    "num_heads",
    "num_head_channels",
    "use_spatial_transformer",
    "use_linear_in_transformer",
    "transformer_depth",
    "context_dim",
    "use_checkpoint",
    "legacy",
    "use_flash_attention",
    "dropout",
    "image_size",
)


def check_unet_config_keys(config: dict[str, Any]) -> None:
    """Raise ConfigError naming the first key of `config` that UNetModel does not take."""
    for key in config:
        if key not in UNET_CONFIG_KEYS:
            raise ConfigError(
                f"model.unet_config.{key}: unknown key; valid keys: {', '.join(UNET_CONFIG_KEYS)}"
            )


def attention_heads(
    channels: int, num_heads: int, num_head_channels: int, legacy: bool, use_spatial_transformer: bool
) -> tuple[int, int]:
    """(heads, dim_head) at a level with `channels` channels, following openaimodel's rule (incl. `legacy`)."""
    if num_head_channels == -1:
        dim_head = channels // num_heads
    else:
        num_heads = channels // num_head_channels
        dim_head = num_head_channels
    if legacy:
        dim_head = channels // num_heads if use_spatial_transformer else num_head_channels
    return num_heads, dim_head


class UNetModel(nn.Module):
    """The SD denoising UNet. Takes the NeMo `unet_config` keys; see docs/CONTRACTS.md for forward().

    `attention_resolutions` lists downsampling factors (1, 2, 4, ...) whose levels get attention.
    `use_flash_attention` routes attention through torch SDPA; `use_checkpoint` recomputes block activations
    in backward while training. `image_size` is accepted for config compatibility and unused.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        attention_resolutions: Sequence[int],
        num_res_blocks: int,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        num_heads: int = -1,
        num_head_channels: int = -1,
        use_spatial_transformer: bool = False,
        use_linear_in_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        use_checkpoint: bool = False,
        legacy: bool = True,
        use_flash_attention: bool = False,
        dropout: float = 0.0,
        image_size: int | None = None,
        **unknown: Any,
    ):
        super().__init__()
        check_unet_config_keys(unknown)
        self._validate(
            model_channels,
            channel_mult,
            num_heads,
            num_head_channels,
            use_spatial_transformer,
            context_dim,
            num_res_blocks,
        )
        self.unet_config: dict[str, Any] = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "model_channels": model_channels,
            "attention_resolutions": [int(r) for r in attention_resolutions],
            "num_res_blocks": num_res_blocks,
            "channel_mult": [int(m) for m in channel_mult],
            "num_heads": num_heads,
            "num_head_channels": num_head_channels,
            "use_spatial_transformer": use_spatial_transformer,
            "use_linear_in_transformer": use_linear_in_transformer,
            "transformer_depth": transformer_depth,
            "context_dim": context_dim,
            "use_checkpoint": use_checkpoint,
            "legacy": legacy,
            "use_flash_attention": use_flash_attention,
            "dropout": dropout,
            "image_size": image_size,
        }
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.attention_resolutions = self.unet_config["attention_resolutions"]
        self.num_res_blocks = num_res_blocks
        self.channel_mult = self.unet_config["channel_mult"]
        self.use_checkpoint = use_checkpoint
        self._attn = {
            "num_heads": num_heads,
            "num_head_channels": num_head_channels,
            "legacy": legacy,
            "use_spatial_transformer": use_spatial_transformer,
            "use_linear": use_linear_in_transformer,
            "depth": int(transformer_depth),
            "context_dim": context_dim,
            "use_sdpa": use_flash_attention,
            "dropout": dropout,
        }
        time_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        skip_channels = self._build_input_blocks(time_dim, dropout)
        ch = self.channel_mult[-1] * model_channels
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_dim, dropout, use_checkpoint=use_checkpoint),
            self._attention_layer(ch),
            ResBlock(ch, time_dim, dropout, use_checkpoint=use_checkpoint),
        )
        self._build_output_blocks(time_dim, dropout, skip_channels)
        self.out = nn.Sequential(
            normalization(model_channels),
            nn.SiLU(),
            zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)),
        )

    @staticmethod
    def _validate(
        model_channels,
        channel_mult,
        num_heads,
        num_head_channels,
        use_spatial_transformer,
        context_dim,
        num_res_blocks,
    ) -> None:
        if num_heads == -1 and num_head_channels == -1:
            raise ConfigError("model.unet_config.num_heads: set num_heads or num_head_channels (both are -1)")
        if use_spatial_transformer and context_dim is None:
            raise ConfigError("model.unet_config.context_dim: required when use_spatial_transformer is true")
        if context_dim is not None and not use_spatial_transformer:
            raise ConfigError(
                "model.unet_config.context_dim: needs use_spatial_transformer: true (got false)"
            )
        if not isinstance(num_res_blocks, int) or num_res_blocks < 1:
            raise ConfigError(
                f"model.unet_config.num_res_blocks: expected an int >= 1, got {num_res_blocks!r}"
            )
        for mult in channel_mult:
            if (model_channels * mult) % 32:
                raise ConfigError(
                    f"model.unet_config.channel_mult: model_channels*mult must be a multiple of 32 "
                    f"(GroupNorm), got {model_channels}*{mult}"
                )

    def _attention_layer(self, ch: int) -> nn.Module:
        a = self._attn
        heads, dim_head = attention_heads(
            ch, a["num_heads"], a["num_head_channels"], a["legacy"], a["use_spatial_transformer"]
        )
        if not a["use_spatial_transformer"]:
            heads = heads if dim_head == -1 else ch // dim_head
            return AttentionBlock(ch, heads, a["use_sdpa"], self.use_checkpoint)
        return SpatialTransformer(
            ch,
            heads,
            dim_head,
            a["depth"],
            a["dropout"],
            a["context_dim"],
            a["use_linear"],
            a["use_sdpa"],
            self.use_checkpoint,
        )

    def _build_input_blocks(self, time_dim: int, dropout: float) -> list[int]:
        """Build `input_blocks`; return the channel count of every skip activation in push order."""
        mc = self.model_channels
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(self.in_channels, mc, 3, padding=1))]
        )
        skip_channels, ch, ds = [mc], mc, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, time_dim, dropout, mult * mc, self.use_checkpoint)]
                ch = mult * mc
                if ds in self.attention_resolutions:
                    layers.append(self._attention_layer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, True, ch)))
                skip_channels.append(ch)
                ds *= 2
        return skip_channels

    def _build_output_blocks(self, time_dim: int, dropout: float, skip_channels: list[int]) -> None:
        mc = self.model_channels
        self.output_blocks = nn.ModuleList()
        ch = self.channel_mult[-1] * mc
        ds = 2 ** (len(self.channel_mult) - 1)
        skip_channels = list(skip_channels)
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                skip = skip_channels.pop()
                layers: list[nn.Module] = [
                    ResBlock(ch + skip, time_dim, dropout, mc * mult, self.use_checkpoint)
                ]
                ch = mc * mult
                if ds in self.attention_resolutions:
                    layers.append(self._attention_layer(ch))
                if level and i == self.num_res_blocks:
                    layers.append(Upsample(ch, True, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, in_channels, H, W) with H, W divisible by 2**(levels-1); timesteps: (B,) or scalar;
        context: (B, T, context_dim) | None; context_mask: (B, T) bool, True = real token | None.
        Returns (B, out_channels, H, W)."""
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        param_dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(param_dtype))
        if context is not None:
            context = context.to(param_dtype)
        h = x.to(param_dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context, context_mask)
            skips.append(h)
        h = self.middle_block(h, emb, context, context_mask)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h)
