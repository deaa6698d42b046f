"""Small building blocks shared by the UNets: timestep and size embeddings, norms, resampling, zero-init."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep embedding, cosine half first (openaimodel; diffusers flip_sin_to_cos=True, shift 0).

    timesteps: (B,) float or integer, possibly fractional. Returns (B, dim) float32.
    Frequencies are exp(-log(max_period) * i / half) for i in [0, half).
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * (
        -math.log(max_period) / half
    )
    angles = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def size_embedding(values: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """SDXL micro-conditioning: each of N scalars (sizes, crop offsets, aesthetic score) embedded like a timestep.

    values: (B, N), e.g. [orig_h, orig_w, crop_top, crop_left, target_h, target_w]. Returns (B, N * dim) float32,
    value by value with the cosine half first (sgm's ConcatTimestepEmbedderND; diffusers' `add_time_proj` on
    `time_ids.flatten()`). The UNet's ADM vector is y = cat([pooled text, size_embedding(values)], dim=-1).
    """
    b, n = values.shape
    return timestep_embedding(values.reshape(b * n), dim).reshape(b, n * dim)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (openaimodel `normalization`), cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return super().forward(x)
        # Half-precision weights must be upcast with the input, or group_norm sees mixed dtypes.
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int, groups: int = 32, eps: float = 1e-5) -> GroupNorm32:
    """The UNets' norm: `groups` groups over `channels` (openaimodel uses 32; diffusers' `norm_num_groups`)."""
    return GroupNorm32(groups, channels, eps=eps)


def fitted_normalization(channels: int, max_groups: int = 32) -> GroupNorm32:
    """GroupNorm32 with gcd(max_groups, channels) groups: 32 for real widths, fewer for tiny test models."""
    return GroupNorm32(math.gcd(max_groups, channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` (output projections start as identity residuals) and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv (`op`), or average pooling when `use_conv` is False.

    (B, C, H, W) -> (B, out_channels, H/2, W/2).
    """

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError("Downsample without conv cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repeat, then an optional 3x3 conv (`conv`).

    (B, C, H, W) -> (B, out_channels, 2H, 2W).
    """

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x


def run_conditioned_layers(
    layers: nn.Module,
    x: torch.Tensor,
    emb: torch.Tensor,
    context: torch.Tensor | None,
    mask: torch.Tensor | None,
    takes_emb: tuple[type, ...],
    takes_context: tuple[type, ...],
) -> torch.Tensor:
    """Run `layers` in order, handing the timestep embedding to `takes_emb` layers and the text (with its mask)
    to `takes_context` layers; every other layer sees only x."""
    for layer in layers:
        if isinstance(layer, takes_emb):
            x = layer(x, emb)
        elif isinstance(layer, takes_context):
            x = layer(x, context, mask)
        else:
            x = layer(x)
    return x


def run_skip_levels(
    input_blocks: nn.ModuleList, middle_block: nn.Module, output_blocks: nn.ModuleList, h: torch.Tensor, *cond
) -> torch.Tensor:
    """The UNet's down path, middle and up path, each up block taking the matching down block's output."""
    skips = []
    for block in input_blocks:
        h = block(h, *cond)
        skips.append(h)
    h = middle_block(h, *cond)
    for block in output_blocks:
        h = block(torch.cat([h, skips.pop()], dim=1), *cond)
    return h


class ConcatInputs(nn.Module):
    """A backbone whose input is its latents with extra channels concatenated after them (diffusers' inpainting
    UNet: mask + masked-image latents; InstructPix2Pix: source-image latents).

    Called as `net(x, t, concat=(B, C_extra, H, W), **cond)`. The extra channels join after the denoiser has
    scaled x, so they reach the backbone as given, never noised or rescaled."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, concat: torch.Tensor, **cond) -> torch.Tensor:
        return self.net(torch.cat([x, concat.to(device=x.device, dtype=x.dtype)], dim=1), t, **cond)
