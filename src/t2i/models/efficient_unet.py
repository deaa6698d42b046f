"""Imagen Efficient U-Net (Saharia et al. 2022, Appendix B.1, Fig. A.27-A.30), NeMo `unet_type: sr`.

Differences from the Regular UNet, as the paper describes:
- parameters move to the low resolutions: per-level `num_resblocks` lists put more blocks deeper;
- the down path downsamples BEFORE its convolutions (DBlock: strided conv, ResBlocks, attention) and the up path
  upsamples AFTER them (UBlock: ResBlocks, attention, transposed conv), so most convs run at low resolution;
- with `skip_connection_scaling` every ResBlock's shortcut is scaled by 1/sqrt(2) (NeMo's reading of the paper's
  "scale skip connections by 1/sqrt(2)"); the U skips from DBlock to UBlock are added, not concatenated.

Always a super-resolution model: x_low_res is concatenated on channels (bicubic-upsampled here if its size
differs). Like NeMo, the text context width `cond_dim` defaults to `text_embed_dim`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from t2i.errors import ConfigError
from t2i.models.imagen_attention import make_attention_block
from t2i.models.imagen_blocks import (
    CondSequential,
    EfficientResBlock,
    ImagenUNetBase,
    per_level,
    reject_unknown_keys,
)

__all__ = ["EfficientUNet"]


class EfficientUNet(ImagenUNetBase):
    """Efficient U-Net for Imagen's 64->256 and 256->1024 super-resolution stages.

    forward(x (B, channels, H, W), time_cond (B,), text_embed (B, T, text_embed_dim) | None,
    text_mask (B, T) bool | None, x_low_res (B, channels, h, w), aug_cond (B,) | None) -> (B, channels, H, W).
    H and W must be multiples of stride ** (levels - 1).
    """

    low_res_cond = True  # always super-resolution
    _low_res_flag = "unet_type sr"

    def __init__(
        self,
        embed_dim: int,
        image_size: int,
        channels: int = 3,
        text_embed_dim: int = 512,
        channel_mult: Sequence[int] = (1, 1, 2, 4, 8),
        num_attn_heads: int = 8,
        per_head_channels: int = 64,
        attention_type: str = "fused",
        atnn_enabled_at: Sequence[int] = (0, 0, 0, 0, 1),
        feature_pooling_type: str = "attention",
        stride: int = 2,
        num_resblocks: int | Sequence[int] = (1, 2, 4, 8, 8),
        learned_sinu_pos_emb_dim: int = 16,
        use_null_token: bool = False,
        init_conv_kernel_size: int = 3,
        gradient_checkpointing: bool = False,
        scale_shift_norm: bool = True,
        stable_attention: bool = True,
        flash_attention: bool = False,
        skip_connection_scaling: bool = False,
        noise_cond_aug: bool = False,
        cond_dim: int | None = None,
        **unknown: Any,
    ):
        super().__init__()
        reject_unknown_keys(unknown, EfficientUNet)
        if stride < 2 or stride % 2:
            raise ConfigError(f"model.unet.stride: {stride}; expected an even resampling factor >= 2")
        levels = len(channel_mult)
        self.image_size, self.stride, self.levels = image_size, stride, levels
        self._total_downsampling = stride ** (levels - 1)
        blocks = per_level("num_resblocks", num_resblocks, levels)
        attn_at = per_level("atnn_enabled_at", atnn_enabled_at, levels)
        cond_dim = cond_dim or text_embed_dim
        time_dim = self._build_conditioning(
            embed_dim, learned_sinu_pos_emb_dim, text_embed_dim, cond_dim, feature_pooling_type,
            use_null_token, noise_cond_aug,
        )  # fmt: skip

        def res(ch: int, out: int) -> EfficientResBlock:
            return EfficientResBlock(
                ch, time_dim, out, scale_shift_norm, skip_connection_scaling, gradient_checkpointing
            )

        def attention(ch: int) -> nn.Module:
            return make_attention_block(
                attention_type, ch, cond_dim, num_attn_heads, per_head_channels,
                stable_attention, flash_attention, gradient_checkpointing,
            )  # fmt: skip

        init_dim = embed_dim * channel_mult[0]
        self.init_conv = nn.Conv2d(
            2 * channels, init_dim, init_conv_kernel_size, padding=init_conv_kernel_size // 2
        )
        kernel, pad = 2 * stride, stride // 2
        self.DBlocks, self.UBlocks = nn.ModuleList(), nn.ModuleList()
        ch = init_dim
        for level, mult in enumerate(channel_mult):
            out, resample = embed_dim * mult, level < levels - 1
            down = [nn.Conv2d(ch, ch, kernel, stride=stride, padding=pad)] if resample else []
            down += [res(ch if i == 0 else out, out) for i in range(blocks[level])]
            up = [res(out if i == 0 else ch, ch) for i in range(blocks[level])]
            if attn_at[level]:
                down.append(attention(out))
                up.append(attention(ch))
            if resample:
                up.append(nn.ConvTranspose2d(ch, ch, kernel, stride=stride, padding=pad))
            self.DBlocks.append(CondSequential(down))
            self.UBlocks.append(CondSequential(up))
            ch = out
        self.out = nn.Conv2d(init_dim, channels, 1)

    def _forward_layers(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        h = self.init_conv(x)
        skips = []
        for dblock in self.DBlocks:
            h = dblock(h, emb, context, mask)
            skips.append(h)
        skips.pop()  # the deepest DBlock feeds the deepest UBlock directly
        for level in reversed(range(self.levels)):
            if level < self.levels - 1:
                h = h + skips.pop()
            h = self.UBlocks[level](h, emb, context, mask)
        return self.out(h)
