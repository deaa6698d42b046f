"""Building blocks shared by the Imagen Regular UNet and Efficient UNet (NeMo MegatronImagen semantics).

Residual blocks, the conditioning sequential, the UNet base (inputs, conditioning vector, forward contract) and
config checks. The scalar/text conditioning lives in `imagen_conditioning.py`, the attention kinds in
`imagen_attention.py` (re-exported here).

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
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from t2i.errors import ConfigError, InvalidInputError
from t2i.models.imagen_attention import (
    ATTENTION_TYPES,
    AttentionBlockBase,
    GEGLUFeedForward,
    attention_core,
    make_attention_block,
    maybe_checkpoint,
)
from t2i.models.imagen_conditioning import POOLING_TYPES, ScalarEmbedding, TextConditioner
from t2i.models.layers import fitted_normalization, run_conditioned_layers, zero_module

__all__ = [  # attention names are re-exported for callers that import them from here
    "ATTENTION_TYPES",
    "AttentionBlockBase",
    "CondSequential",
    "EfficientResBlock",
    "GEGLUFeedForward",
    "ImagenUNetBase",
    "ResBlock",
    "attention_core",
    "make_attention_block",
]


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
        self.in_norm = fitted_normalization(channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.resample: nn.Module = nn.Identity()
        if up:
            self.resample = nn.Upsample(scale_factor=2, mode="nearest")
        elif down:
            self.resample = nn.AvgPool2d(2)
        self.emb_proj = nn.Linear(emb_channels, (2 if scale_shift_norm else 1) * out_channels)
        self.out_norm = fitted_normalization(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
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
        self.in_norm = fitted_normalization(channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, (2 if scale_shift_norm else 1) * out_channels)
        self.out_norm = fitted_normalization(out_channels)
        self.out_conv = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
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
        return run_conditioned_layers(self, x, emb, context, mask, (ResBlock, EfficientResBlock), (AttentionBlockBase,))


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
