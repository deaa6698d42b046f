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
    """Text encoder: `kind` picks the family, `path` a local folder (None = the kind's default location).

    `layer`: `last`, `penultimate` (SD 2), `penultimate_hidden` (SDXL: hidden_states[-2], no final norm) or a
    hidden-state index. `always_return_pooled` (NeMo's name): the encoder's pooled output (CLIP: the end token's
    final-norm state, through the projection when there is one) also conditions the UNet, as the first part of
    the ADM vector y (SDXL's bigG). Openclip: `version` is a local open_clip checkpoint (or an sgm/SD 2 single
    file), `path` the tokenizer folder, `arch` the tower (`ViT-bigG-14`, ...)."""

    kind: Literal["clip", "openclip", "t5", "minilm"] = "minilm"
    path: str | None = None
    layer: str | int = "last"
    max_length: int = 77
    arch: str | None = None
    version: str | None = None
    always_return_pooled: bool = False

    def check(self, key: str) -> None:
        _require(self.max_length >= 1, f"{key}.max_length", self.max_length, "an integer >= 1 (tokens per prompt)")


# Batch keys a conditioner reads (NeMo / sgm names). Size keys hold (B, 2) (height, width) or (top, left);
# `aesthetic_score` (B,) or (B, 1).
TEXT_INPUT_KEY = "captions"
SIZE_INPUT_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple", "aesthetic_score")
InputKey = Literal["captions", "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple",
                   "aesthetic_score"]  # fmt: skip


@dataclass
class SizeEmbedderConfig:
    """sgm's ConcatTimestepEmbedderND: each value of the input (sizes, crop offsets, aesthetic score) embedded
    like a timestep into `outdim` features (cosine half first), concatenated into the ADM vector y."""

    kind: Literal["size"] = "size"
    outdim: int = 256

    def check(self, key: str) -> None:
        _require(self.outdim >= 2 and self.outdim % 2 == 0, f"{key}.outdim", self.outdim, "an even integer >= 2")


@dataclass
class EmbedderConfig:
    """One embedder of the conditioner (NeMo's `emb_models` entry): what it reads from the batch (`input_key`),
    its classifier-free-guidance dropout (`ucg_rate`: the probability that a training sample gets its null
    conditioning) and the model (`emb_model`, picked by `kind`: a text encoder or `size`).

    The null conditioning is zeros (sgm's default), or for text embedders the encoding of `legacy_ucg_value`
    when set (`""`: the empty prompt, SD 1/2's dropout)."""

    input_key: InputKey = "captions"
    ucg_rate: float = 0.0
    legacy_ucg_value: str | None = None
    emb_model: CondStageConfig | SizeEmbedderConfig = field(default_factory=CondStageConfig)

    @property
    def is_text(self) -> bool:
        return not isinstance(self.emb_model, SizeEmbedderConfig)

    def check(self, key: str) -> None:
        _require(0 <= self.ucg_rate <= 1, f"{key}.ucg_rate", self.ucg_rate, "a number in [0, 1]")
        _require(self.legacy_ucg_value in (None, ""), f"{key}.legacy_ucg_value", self.legacy_ucg_value,
                 'null (zeros) or "" (the empty prompt)')  # fmt: skip
        if self.is_text:
            _require(self.input_key == TEXT_INPUT_KEY, f"{key}.input_key", self.input_key,
                     f"{TEXT_INPUT_KEY} for a text embedder ({self.emb_model.kind})")  # fmt: skip
        else:
            _require(self.input_key in SIZE_INPUT_KEYS, f"{key}.input_key", self.input_key,
                     f"one of {', '.join(SIZE_INPUT_KEYS)} for a size embedder")  # fmt: skip
            _require(self.legacy_ucg_value is None, f"{key}.legacy_ucg_value", self.legacy_ucg_value,
                     "null for a size embedder (its null conditioning is zeros)")  # fmt: skip


@dataclass
class ConditionerConfig:
    """Several embedders (NeMo's `conditioner_config.emb_models`), applied in order. Text embedders' token
    embeddings are concatenated feature-wise into `context` (SDXL: 768 + 1280 = 2048); pooled text
    (`always_return_pooled`) and size embeddings are concatenated, in order, into the ADM vector y."""

    emb_models: list[EmbedderConfig] = field(default_factory=list)

    def check(self, key: str) -> None:
        _require(any(e.is_text for e in self.emb_models), f"{key}.emb_models",
                 [e.emb_model.kind for e in self.emb_models], "at least one text embedder")  # fmt: skip


@dataclass
class LatentDiffusionConfig:
    """Stable Diffusion family: a discrete-time UNet in a VAE latent space, conditioned on text.

    Conditioning: SD 1/2 name one text encoder, `cond_stage_config`, dropped to the empty prompt at
    `text_drop_rate`. SDXL sets `conditioner_config` (several embedders, each with its own `ucg_rate`), and then
    `cond_stage_config` and `text_drop_rate` are unused. `embedders()` gives the list in both cases."""

    kind: Literal["latent_diffusion"] = "latent_diffusion"
    parameterization: Literal["eps", "v", "x0"] = "eps"
    timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    linear_start: float = 0.00085
    linear_end: float = 0.012
    zero_terminal_snr: bool = False  # betas rescaled to zero SNR at t = T (Lin et al. 2023; use with v prediction)
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
    conditioner_config: ConditionerConfig | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig | None = None

    def embedders(self) -> list[EmbedderConfig]:
        """The conditioner's embedders: `conditioner_config.emb_models`, or SD 1/2's one text embedder
        (`cond_stage_config`, empty-prompt dropout at `text_drop_rate`)."""
        if self.conditioner_config is not None:
            return list(self.conditioner_config.emb_models)
        return [EmbedderConfig(TEXT_INPUT_KEY, self.text_drop_rate, "", self.cond_stage_config)]

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
