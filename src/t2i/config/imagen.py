"""Schemas of an Imagen cascade stage (`model.kind: imagen`), with the key names of NeMo's Imagen configs.

`unet_type` picks the backbone schema of `model.unet` (base and sr-unet: the Regular UNet; sr: the Efficient
UNet) and `preconditioning_type` the schema of `model.preconditioning` (EDM or continuous-time DDPM); each
section records the schema it was read with as `kind`. The backbone keys mirror the keyword arguments of
`t2i.models.imagen_unet.ImagenUNet` and `EfficientUNet`, defaults included (a test holds them equal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from t2i.config.common import LoraConfig, OptimConfig
from t2i.config.validation import require as _require
from t2i.errors import ConfigError

UNET_KIND_OF_TYPE = {"base": "regular", "sr-unet": "regular", "sr": "efficient"}
PRECONDITIONING_KIND = {"EDM": "EDM", "DDPM": "DDPM"}


def _check_required(cfg: object, key: str, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(cfg, name) is None:
            raise ConfigError(f"{key}.{name}: missing; every Imagen stage needs it")


@dataclass
class _ImagenBackboneConfig:
    """The keys (and defaults) both Imagen backbones share; `embed_dim` and `image_size` are required."""

    embed_dim: int | None = None
    image_size: int | None = None
    channels: int = 3
    text_embed_dim: int = 512
    per_head_channels: int = 64
    attention_type: str = "fused"
    feature_pooling_type: str = "attention"
    learned_sinu_pos_emb_dim: int = 16
    use_null_token: bool = False
    init_conv_kernel_size: int = 3
    gradient_checkpointing: bool = False
    scale_shift_norm: bool = True
    stable_attention: bool = True
    flash_attention: bool = False
    noise_cond_aug: bool = False

    def check(self, key: str) -> None:
        _check_required(self, key, ("embed_dim", "image_size"))


@dataclass
class ImagenUNetConfig(_ImagenBackboneConfig):
    """NeMo's Regular UNet (`unet_type: base | sr-unet`). `low_res_cond` null means true for sr-unet."""

    kind: Literal["regular"] = "regular"
    num_res_blocks: int | list[int] = 3
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    num_attn_heads: int = 4
    cond_dim: int = 512
    attention_resolutions: list[int] = field(default_factory=lambda: [8, 16, 32])
    dropout: bool | float = False
    resblock_updown: bool = False
    resample_with_conv: bool = True
    low_res_cond: bool | None = None


@dataclass
class EfficientUNetConfig(_ImagenBackboneConfig):
    """NeMo's Efficient UNet (`unet_type: sr`)."""

    kind: Literal["efficient"] = "efficient"
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 4, 8])
    num_attn_heads: int = 8
    atnn_enabled_at: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 1])
    stride: int = 2
    num_resblocks: int | list[int] = field(default_factory=lambda: [1, 2, 4, 8, 8])
    skip_connection_scaling: bool = False
    cond_dim: int | None = None


@dataclass
class EDMConfig:
    """`model.preconditioning` under EDM (Karras et al. 2022, Table 1), plus the sampling noise range."""

    kind: Literal["EDM"] = "EDM"
    loss_type: Literal["l1", "l2", "huber"] = "l2"
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def check(self, key: str) -> None:
        for name in ("sigma_data", "p_std", "sigma_min", "sigma_max", "rho"):
            _require(getattr(self, name) > 0, f"{key}.{name}", getattr(self, name), "a number > 0")


@dataclass
class ContinuousDDPMConfig:
    """`model.preconditioning` under continuous-time DDPM (NeMo's `ContinousDDPM`)."""

    kind: Literal["DDPM"] = "DDPM"
    loss_type: Literal["l1", "l2", "huber"] = "l2"
    pred_objective: Literal["noise", "x_start"] = "noise"
    noise_schedule: Literal["linear", "cosine"] = "cosine"
    timesteps: int = 1000

    def check(self, key: str) -> None:
        _require(self.timesteps >= 1, f"{key}.timesteps", self.timesteps, "an integer >= 1")


@dataclass
class ImagenConditioningConfig:
    """`model.conditioning`: text embeddings (and the SR stage's low-res size).

    precached_key: name of the embeddings inside precached shards' `captions_encoded` (falls back to
    `embeddings`); set it (with online_encoding false) to train from precached shards.
    """

    embed_dim: int = 384
    token_length: int = 16
    drop_rate: float = 0.1
    precached_key: str | None = None
    online_encoding: bool | None = None
    encoder_kind: Literal["t5", "clip", "openclip", "minilm"] = "minilm"
    encoder_path: str | None = None
    low_res_size: int | None = None

    def check(self, key: str) -> None:
        _require(self.embed_dim >= 1, f"{key}.embed_dim", self.embed_dim, "an integer >= 1")
        _require(self.token_length >= 1, f"{key}.token_length", self.token_length, "an integer >= 1")
        _require(0 <= self.drop_rate <= 1, f"{key}.drop_rate", self.drop_rate, "a number in [0, 1]")
        if self.online_encoding is False and self.precached_key is None:
            raise ConfigError(
                f"{key}.precached_key: null with online_encoding false; expected the name of the "
                "precached embeddings (e.g. embeddings) or online_encoding: true"
            )

    @property
    def online(self) -> bool:
        """True when captions are encoded on every step (no precached shards)."""
        return self.precached_key is None if self.online_encoding is None else bool(self.online_encoding)


@dataclass
class NoiseAugConfig:
    """`model.noise_aug` (SR stages): noise-conditioning augmentation of the low-res input during training.

    enabled: null means on exactly when the backbone takes the augmentation level (`model.unet.noise_cond_aug`).
    per_sample: draw one augmentation level per sample (NeMo's default) or one per batch. Under EDM the level
    is sigma_aug from the training log-normal; under DDPM a continuous time in [0, max_level].
    """

    enabled: bool | None = None
    per_sample: bool = True
    max_level: float = 1.0

    def check(self, key: str) -> None:
        _require(0 < self.max_level <= 1, f"{key}.max_level", self.max_level, "a number in (0, 1]")


@dataclass
class ImagenConfig:
    """One Imagen cascade stage: its backbone, preconditioning, text conditioning and augmentation."""

    # `noise_cond_aug` at the model level was renamed `noise_aug` (it clashed with the backbone flag
    # `unet.noise_cond_aug`); stage folders written before still load.
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"noise_cond_aug": "noise_aug"}

    kind: Literal["imagen"] = "imagen"
    unet_type: Literal["base", "sr-unet", "sr"] = "base"
    unet: ImagenUNetConfig | EfficientUNetConfig = field(
        default_factory=ImagenUNetConfig, metadata={"kind_from": ("unet_type", UNET_KIND_OF_TYPE)}
    )
    preconditioning_type: Literal["EDM", "DDPM"] = "EDM"
    preconditioning: EDMConfig | ContinuousDDPMConfig = field(
        default_factory=EDMConfig, metadata={"kind_from": ("preconditioning_type", PRECONDITIONING_KIND)}
    )
    conditioning: ImagenConditioningConfig = field(default_factory=ImagenConditioningConfig)
    noise_aug: NoiseAugConfig | bool | None = None
    channels_last: bool = False
    inductor: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    # a stage folder (or a t2i run folder with one under export/) whose weights initialise the UNet
    from_pretrained: str | None = None
    lora: LoraConfig | None = None  # LoRA on the from_pretrained stage; only the adapters train

    def __post_init__(self) -> None:
        if self.noise_aug is None or isinstance(self.noise_aug, bool):
            self.noise_aug = NoiseAugConfig(enabled=self.noise_aug)

    @property
    def augments_low_res(self) -> bool:
        """Whether training noise-augments the low-res input (`noise_aug.enabled`, null: the backbone's flag)."""
        enabled = self.noise_aug.enabled
        return bool(self.unet.noise_cond_aug) if enabled is None else enabled

    @property
    def is_sr(self) -> bool:
        return self.unet_type != "base"

    @property
    def image_size(self) -> int:
        return int(self.unet.image_size)

    @property
    def low_res_size(self) -> int | None:
        if not self.is_sr:
            return None
        return self.conditioning.low_res_size or self.image_size // 4

    def check(self, key: str) -> None:
        if self.unet.text_embed_dim != self.conditioning.embed_dim:
            raise ConfigError(
                f"{key}.conditioning.embed_dim: {self.conditioning.embed_dim} must equal "
                f"{key}.unet.text_embed_dim {self.unet.text_embed_dim}"
            )
        if self.augments_low_res and not self.is_sr:
            raise ConfigError(
                f"{key}.noise_aug: only super-resolution stages (unet_type sr-unet | sr) augment a low-res input; "
                "expected null or false for unet_type base"
            )
        if self.is_sr and self.low_res_size >= self.image_size:
            raise ConfigError(
                f"{key}.conditioning.low_res_size: {self.low_res_size}; expected less than "
                f"{key}.unet.image_size {self.image_size}"
            )
