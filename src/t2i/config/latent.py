"""Schemas of the SD (latent diffusion) family and of its first-stage autoencoder, with NeMo's key names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from t2i.config.common import LoraConfig, OptimConfig
from t2i.config.validation import require as _require


@dataclass
class UNetConfig:
    """SD UNetModel keyword arguments (openaimodel / sgm names), plus `from_pretrained` (not passed to the model):
    a pipeline folder or UNet weights file whose weights initialise training. Defaults are SD 1.5's.

    This dataclass is the one list of UNet keys and defaults: `UNetModel`, the diffusers converter and the YAML
    loader all take theirs from here. SDXL adds `transformer_depth` per level (a level or a middle block of depth 0
    has no transformer; `transformer_depth_middle` null = the last level's depth), `norm_num_groups` (diffusers'
    name) and the ADM vector input (`num_classes: sequential` with `adm_in_channels`: y (B, adm_in_channels) is
    embedded by `label_emb` and added to the time embedding)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: list[int] = field(default_factory=lambda: [4, 2, 1])
    num_res_blocks: int = 2
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_heads: int = 8
    num_head_channels: int = -1
    use_spatial_transformer: bool = True
    use_linear_in_transformer: bool = False
    transformer_depth: int | list[int] = 1
    transformer_depth_middle: int | None = None
    context_dim: int | None = 768
    num_classes: Literal["sequential"] | None = None
    adm_in_channels: int | None = None
    norm_num_groups: int = 32
    use_checkpoint: bool = False
    legacy: bool = False
    use_flash_attention: bool = True
    dropout: float = 0.0
    image_size: int | None = None
    from_pretrained: str | None = None

    def model_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for `UNetModel(**kwargs)` (everything but `from_pretrained`)."""
        kwargs = dataclasses.asdict(self)
        kwargs.pop("from_pretrained")
        return kwargs


@dataclass
class DDConfig:
    """AutoencoderKL encoder/decoder knobs (CompVis `ddconfig`). Defaults are the SD VAE's."""

    double_z: bool = True
    z_channels: int = 4
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    dropout: float = 0.0
    norm_num_groups: int = 32


@dataclass
class FirstStageConfig:
    """The SD VAE: `from_pretrained` is a pipeline/VAE folder or weights file; None = random init (tests)."""

    embed_dim: int = 4
    from_pretrained: str | None = None
    ddconfig: DDConfig = field(default_factory=DDConfig)


@dataclass
class CondStageConfig:
    """Text encoder: `kind` picks the family, `path` a local folder (None = the kind's default location)."""

    kind: Literal["clip", "openclip", "t5", "minilm"] = "minilm"
    path: str | None = None
    layer: str | int = "last"
    max_length: int = 77
    arch: str | None = None
    version: str | None = None

    def check(self, key: str) -> None:
        _require(self.max_length >= 1, f"{key}.max_length", self.max_length, "an integer >= 1 (tokens per prompt)")


@dataclass
class LatentDiffusionConfig:
    """Stable Diffusion family: a discrete-time UNet in a VAE latent space, conditioned on text."""

    kind: Literal["latent_diffusion"] = "latent_diffusion"
    parameterization: Literal["eps", "v", "x0"] = "eps"
    timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    linear_start: float = 0.00085
    linear_end: float = 0.012
    scale_factor: float = 0.18215
    shift_factor: float = 0.0  # latents = (z - shift) * scale (FLUX-style VAEs; SD's VAE has none)
    first_stage_key: Literal["images", "image_encoded"] = "images"
    cond_stage_key: Literal["captions", "captions_encoded"] = "captions"
    text_drop_rate: float = 0.1
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    channels_last: bool = False
    inductor: bool = False
    unet_config: UNetConfig = field(default_factory=UNetConfig)
    first_stage_config: FirstStageConfig = field(default_factory=FirstStageConfig)
    cond_stage_config: CondStageConfig = field(default_factory=CondStageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig | None = None

    def check(self, key: str) -> None:
        _require(self.timesteps >= 1, f"{key}.timesteps", self.timesteps, "an integer >= 1")
        if self.beta_schedule in ("linear", "scaled_linear"):
            _require(0 < self.linear_start < 1, f"{key}.linear_start", self.linear_start, "a beta in (0, 1)")
            _require(self.linear_start <= self.linear_end < 1, f"{key}.linear_end", self.linear_end,
                     f"a beta in [linear_start={self.linear_start}, 1)")
        _require(0 <= self.text_drop_rate <= 1, f"{key}.text_drop_rate", self.text_drop_rate, "a number in [0, 1]")
        if self.min_snr_gamma is not None:
            _require(self.min_snr_gamma > 0, f"{key}.min_snr_gamma", self.min_snr_gamma, "null or a number > 0")


@dataclass
class AutoencoderLossConfig:
    """VAE training loss: pixel reconstruction + KL (+ optional perceptual and adversarial terms)."""

    pixel_loss: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1.0e-6
    perceptual_weight: float = 0.0
    disc_weight: float = 0.0
    disc_start: int = 0


@dataclass
class AutoencoderConfig:
    """Training (or fine-tuning) the first-stage AutoencoderKL itself."""

    kind: Literal["autoencoder"] = "autoencoder"
    embed_dim: int = 4
    from_pretrained: str | None = None
    ddconfig: DDConfig = field(default_factory=DDConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    channels_last: bool = False
    inductor: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
