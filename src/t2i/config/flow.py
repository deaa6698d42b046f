"""Schemas of the rectified-flow family (`model.kind: flow`): a transformer that predicts the flow velocity, in the
latent space of a VAE, conditioned on a token sequence and a pooled vector. FLUX.1 is `transformer_config.kind:
flux` with T5 tokens as context and the pooled CLIP vector; the CPU-sized config uses MiniLM for both.

`transformer_config` is picked by its `kind`: a backbone family is one more schema here (with its own `kind`
literal) plus the module that builds it (see docs/CONTRACTS.md, "Adding a model family").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from t2i.config.common import LoraConfig, OptimConfig
from t2i.config.latent import CondStageConfig, DDConfig, FirstStageConfig
from t2i.config.validation import require as _require


@dataclass
class FluxTransformerConfig:
    """`t2i.models.flux.FluxTransformer` keyword arguments (BFL's `FluxParams` names; defaults FLUX.1-dev), plus
    `from_pretrained`: a diffusers transformer or pipeline folder, or a BFL single file, whose weights initialise
    training. `in_channels` counts the channels of a packed 2x2 token (16 latent channels -> 64)."""

    kind: Literal["flux"] = "flux"
    in_channels: int = 64
    out_channels: int | None = None
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    theta: float = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True
    patch_size: int = 2
    use_checkpoint: bool = False
    from_pretrained: str | None = None

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the backbone (everything but `kind` and `from_pretrained`)."""
        kwargs = dataclasses.asdict(self)
        kwargs.pop("kind")
        kwargs.pop("from_pretrained")
        return kwargs

    def check(self, key: str) -> None:
        for name in ("in_channels", "hidden_size", "num_heads", "patch_size"):
            _require(getattr(self, name) >= 1, f"{key}.{name}", getattr(self, name), "an integer >= 1")
        _require(self.depth + self.depth_single_blocks >= 1, f"{key}.depth", self.depth,
                 "at least one double or single block")  # fmt: skip


# The union of backbone schemas `transformer_config` is picked from (add a schema here for a new backbone).
TransformerConfig = FluxTransformerConfig


@dataclass
class FlowFirstStageConfig(FirstStageConfig):
    """The VAE of a flow model: FLUX.1's 16-channel AutoencoderKL without quant convs by default."""

    embed_dim: int = 16
    ddconfig: DDConfig = field(default_factory=lambda: DDConfig(z_channels=16))
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False


@dataclass
class FlowTextConfig(CondStageConfig):
    """One text encoder. `attention_mask: false` runs it without the padding mask (FLUX.1's T5 was trained on such
    embeddings, padding tokens included)."""

    attention_mask: bool = True


@dataclass
class FlowScheduleConfig:
    """The time schedule, with diffusers' FlowMatchEulerDiscreteScheduler names: SD3's fixed `shift`, or Flux's
    resolution-dependent shift mu (`use_dynamic_shifting`), the line through (base_image_seq_len, base_shift)
    and (max_image_seq_len, max_shift) in packed tokens. Training and sampling both follow it."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: Literal["exponential", "linear"] = "exponential"

    def check(self, key: str) -> None:
        _require(self.num_train_timesteps >= 1, f"{key}.num_train_timesteps", self.num_train_timesteps,
                 "an integer >= 1")  # fmt: skip
        _require(self.shift > 0, f"{key}.shift", self.shift, "a number > 0")
        _require(self.max_image_seq_len > self.base_image_seq_len, f"{key}.max_image_seq_len",
                 self.max_image_seq_len, "an integer > base_image_seq_len")  # fmt: skip


@dataclass
class FlowLossConfig:
    """The rectified-flow loss: diffusers' `weighting_scheme` (`none`, `logit_normal` and `mode` pick SD3's time
    densities; `sigma_sqrt` and `cosmap` weight uniform times), its parameters and the error function."""

    weighting_scheme: Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    loss_type: Literal["l2", "l1", "huber"] = "l2"


@dataclass
class FlowConfig:
    """A rectified-flow model: velocity-predicting transformer in a VAE latent space (FLUX.1, and Flux-shaped small
    models). Latents are (z - shift_factor) * scale_factor.

    Text: `context_encoder` gives the token sequence (FLUX.1: T5-XXL, 4096-d, `transformer_config.context_in_dim`),
    `pooled_encoder` the pooled vector (FLUX.1: CLIP-L's pooled output, `vec_in_dim`); null takes the pooled output
    of the context encoder (MiniLM's masked mean). `mask_text_tokens` passes the padding mask to the transformer
    (FLUX.1 attends to every token). `guidance_scale` is the distilled guidance a guidance-embedding transformer is
    trained at (diffusers' training scripts: 3.5) and the default it samples with; text dropout at `text_drop_rate`
    gives classifier-free guidance (true CFG) to models trained here.
    """

    kind: Literal["flow"] = "flow"
    transformer_config: TransformerConfig = field(default_factory=FluxTransformerConfig)
    first_stage_config: FlowFirstStageConfig = field(default_factory=FlowFirstStageConfig)
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    context_encoder: FlowTextConfig = field(
        default_factory=lambda: FlowTextConfig(kind="t5", max_length=512, arch="t5-v1_1-xxl", attention_mask=False)
    )
    pooled_encoder: FlowTextConfig | None = field(
        default_factory=lambda: FlowTextConfig(kind="clip", max_length=77)
    )
    mask_text_tokens: bool = False
    schedule: FlowScheduleConfig = field(default_factory=FlowScheduleConfig)
    loss: FlowLossConfig = field(default_factory=FlowLossConfig)
    guidance_scale: float = 3.5
    text_drop_rate: float = 0.1
    first_stage_key: Literal["images", "image_encoded"] = "images"
    cond_stage_key: Literal["captions", "captions_encoded"] = "captions"
    inductor: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig | None = None

    def check(self, key: str) -> None:
        _require(0 <= self.text_drop_rate <= 1, f"{key}.text_drop_rate", self.text_drop_rate, "a number in [0, 1]")
        _require(self.scale_factor > 0, f"{key}.scale_factor", self.scale_factor, "a number > 0")
        latent = self.transformer_config.in_channels // self.transformer_config.patch_size**2
        _require(latent == self.first_stage_config.embed_dim, f"{key}.transformer_config.in_channels",
                 self.transformer_config.in_channels,
                 f"first_stage_config.embed_dim ({self.first_stage_config.embed_dim}) x patch_size**2")  # fmt: skip
