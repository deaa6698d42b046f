"""Imagen Regular UNet (NeMo `unet_type: base` and `sr-unet`) and the config-driven builder for every unet_type.

The network knows nothing about noise schedules: `time_cond` is whatever scalar the preconditioner hands it
(EDM's c_noise = ln(sigma)/4, a continuous t, a log-SNR...). Layout, following NeMo's UNetModel:

    x (+ bicubic-upsampled x_low_res on channels) -> init conv
    down: per level `num_res_blocks` ResBlocks (+ attention where the feature map is one of
          `attention_resolutions` pixels wide), then a stride-2 downsample (not after the last level)
    middle: ResBlock, attention, ResBlock
    up: per level `num_res_blocks + 1` ResBlocks, each on [h, skip] concatenated (+ attention), then a 2x upsample
    out: GroupNorm, SiLU, zero-initialised conv back to `channels`

Conditioning vector = MLP(sinusoid(time_cond)) [+ MLP(sinusoid(aug_cond))] + MLP(pooled text).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from t2i.errors import ConfigError
from t2i.models.efficient_unet import EfficientUNet
from t2i.models.imagen_attention import make_attention_block
from t2i.models.imagen_blocks import (
    CondSequential,
    ImagenUNetBase,
    ResBlock,
    dropout_rate,
    per_level,
    reject_unknown_keys,
    signature_keys,
)
from t2i.models.layers import fitted_normalization, run_skip_levels, zero_module

__all__ = ["UNET_TYPES", "EfficientUNet", "ImagenUNet", "build_imagen_unet", "valid_unet_keys"]

UNET_TYPES = ("base", "sr-unet", "sr")


class ImagenUNet(ImagenUNetBase):
    """NeMo's Regular UNet for the Imagen base64 model and, with `low_res_cond`, for super-resolution.

    forward(x (B, channels, H, W), time_cond (B,), text_embed (B, T, text_embed_dim) | None,
    text_mask (B, T) bool | None, x_low_res (B, channels, h, w) | None, aug_cond (B,) | None)
    -> (B, channels, H, W). Attention heads: `channels // per_head_channels` when per_head_channels > 0
    (NeMo's rule; `num_attn_heads` is then unused), else `num_attn_heads`.
    """

    _low_res_flag = "model.unet.low_res_cond"

    def __init__(
        self,
        embed_dim: int,
        image_size: int,
        channels: int = 3,
        text_embed_dim: int = 512,
        num_res_blocks: int | Sequence[int] = 3,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        num_attn_heads: int = 4,
        per_head_channels: int = 64,
        cond_dim: int = 512,
        attention_type: str = "fused",
        feature_pooling_type: str = "attention",
        learned_sinu_pos_emb_dim: int = 16,
        attention_resolutions: Sequence[int] = (8, 16, 32),
        dropout: bool | float = False,
        use_null_token: bool = False,
        init_conv_kernel_size: int = 3,
        gradient_checkpointing: bool = False,
        scale_shift_norm: bool = True,
        stable_attention: bool = True,
        flash_attention: bool = False,
        resblock_updown: bool = False,
        resample_with_conv: bool = True,
        low_res_cond: bool = False,
        noise_cond_aug: bool = False,
        **unknown: Any,
    ):
        super().__init__()
        reject_unknown_keys(unknown, ImagenUNet)
        if noise_cond_aug and not low_res_cond:
            raise ConfigError(
                "model.unet.noise_cond_aug: needs low_res_cond: true (it augments the low-res input)"
            )
        levels = len(channel_mult)
        self.image_size, self.low_res_cond = image_size, low_res_cond
        self._total_downsampling = 2 ** (levels - 1)
        self._blocks_per_level = per_level("num_res_blocks", num_res_blocks, levels)
        self._attention_ds = _attention_factors(attention_resolutions, image_size)
        self._settings = {
            "attention_type": attention_type,
            "cond_dim": cond_dim,
            "num_attn_heads": num_attn_heads,
            "per_head_channels": per_head_channels,
            "stable": stable_attention,
            "flash": flash_attention,
            "checkpointing": gradient_checkpointing,
            "dropout": dropout_rate(dropout),
            "scale_shift_norm": scale_shift_norm,
        }
        self._resample = (resblock_updown, resample_with_conv)
        self._time_dim = self._build_conditioning(
            embed_dim, learned_sinu_pos_emb_dim, text_embed_dim, cond_dim, feature_pooling_type,
            use_null_token, noise_cond_aug,
        )  # fmt: skip

        init_dim = embed_dim * channel_mult[0]
        in_channels = 2 * channels if low_res_cond else channels
        pad = init_conv_kernel_size // 2
        self.input_blocks = nn.ModuleList(
            [CondSequential([nn.Conv2d(in_channels, init_dim, init_conv_kernel_size, padding=pad)])]
        )
        skips = self._build_down(init_dim, embed_dim, channel_mult)
        ch = skips[-1]
        self.middle_block = CondSequential([self._res(ch, ch), self._attention(ch), self._res(ch, ch)])
        self.output_blocks = nn.ModuleList()
        ch = self._build_up(ch, skips, embed_dim, channel_mult)
        self.out = nn.Sequential(
            fitted_normalization(ch),
            nn.SiLU(),
            zero_module(nn.Conv2d(init_dim, channels, init_conv_kernel_size, padding=pad)),
        )

    # ---------------------------------------------------------------------------------------- construction
    def _res(self, ch: int, out: int, up: bool = False, down: bool = False) -> ResBlock:
        s = self._settings
        return ResBlock(
            ch, self._time_dim, out, s["dropout"], s["scale_shift_norm"], up=up, down=down,
            checkpointing=s["checkpointing"],
        )  # fmt: skip

    def _attention(self, ch: int) -> nn.Module:
        s = self._settings
        return make_attention_block(
            s["attention_type"], ch, s["cond_dim"], s["num_attn_heads"], s["per_head_channels"],
            s["stable"], s["flash"], s["checkpointing"],
        )  # fmt: skip

    def _downsample(self, ch: int) -> nn.Module:
        resblock_updown, with_conv = self._resample
        if resblock_updown:
            return self._res(ch, ch, down=True)
        return nn.Conv2d(ch, ch, 3, stride=2, padding=1) if with_conv else nn.AvgPool2d(2)

    def _upsample(self, ch: int) -> nn.Module:
        resblock_updown, with_conv = self._resample
        if resblock_updown:
            return self._res(ch, ch, up=True)
        return (
            nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1) if with_conv else nn.Upsample(scale_factor=2)
        )

    def _build_down(self, ch: int, embed_dim: int, channel_mult: Sequence[int]) -> list[int]:
        """Append the down path to input_blocks; return the channel count of every block output (the skips)."""
        skips, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(self._blocks_per_level[level]):
                layers = [self._res(ch, mult * embed_dim)]
                ch = mult * embed_dim
                if ds in self._attention_ds:
                    layers.append(self._attention(ch))
                self.input_blocks.append(CondSequential(layers))
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.input_blocks.append(CondSequential([self._downsample(ch)]))
                skips.append(ch)
                ds *= 2
        self._deepest_ds = ds
        return skips

    def _build_up(self, ch: int, skips: list[int], embed_dim: int, channel_mult: Sequence[int]) -> int:
        """Fill output_blocks, consuming the skip channel counts in reverse; return the final channel count."""
        skips, ds = list(skips), self._deepest_ds
        for level in reversed(range(len(channel_mult))):
            blocks = self._blocks_per_level[level]
            for i in range(blocks + 1):
                out = embed_dim * channel_mult[level]
                layers = [self._res(ch + skips.pop(), out)]
                ch = out
                if ds in self._attention_ds:
                    layers.append(self._attention(ch))
                if level > 0 and i == blocks:
                    layers.append(self._upsample(ch))
                    ds //= 2
                self.output_blocks.append(CondSequential(layers))
        return ch

    # --------------------------------------------------------------------------------------------- forward
    def _forward_layers(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return self.out(run_skip_levels(self.input_blocks, self.middle_block, self.output_blocks, x, emb, context, mask))


def _attention_factors(resolutions: Sequence[int], image_size: int) -> set[int]:
    """Pixel resolutions (NeMo `attention_resolutions`) -> downsample factors image_size // resolution."""
    factors = set()
    for res in resolutions:
        if res <= 0 or image_size % int(res):
            raise ConfigError(
                f"model.unet.attention_resolutions: {res} must be a positive divisor of image_size {image_size}"
            )
        factors.add(image_size // int(res))
    return factors


def valid_unet_keys(unet_type: str) -> list[str]:
    """The `model.unet` keys accepted for a unet_type, in signature order."""
    return signature_keys(EfficientUNet if unet_type == "sr" else ImagenUNet)


def build_imagen_unet(unet_type: str, unet: Mapping[str, Any]) -> nn.Module:
    """Build the backbone for `model.unet_type` (base | sr-unet | sr) from the `model.unet` mapping.

    `sr-unet` is the Regular UNet with low_res_cond defaulting to true; `sr` is the Efficient UNet.
    Unknown keys raise ConfigError naming the key and listing the valid ones.
    """
    if unet_type not in UNET_TYPES:
        raise ConfigError(f"model.unet_type: {unet_type!r} is not one of {', '.join(UNET_TYPES)}")
    kwargs = dict(unet)
    for key in ("embed_dim", "image_size"):
        if key not in kwargs:
            raise ConfigError(f"model.unet.{key}: missing; it is required for unet_type {unet_type}")
    if unet_type == "sr":
        return EfficientUNet(**kwargs)
    if unet_type == "sr-unet":
        kwargs.setdefault("low_res_cond", True)
    return ImagenUNet(**kwargs)
