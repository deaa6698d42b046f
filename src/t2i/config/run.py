"""The whole run: `model.kind` picks the model schema; data, trainer and the `RunConfig` that holds them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from t2i.config.flow import FlowConfig
from t2i.config.imagen import ImagenConfig
from t2i.config.latent import AutoencoderConfig, LatentDiffusionConfig
from t2i.config.validation import require as _require

ModelConfig = LatentDiffusionConfig | AutoencoderConfig | ImagenConfig | FlowConfig
MODEL_SCHEMAS: dict[str, type] = {
    "latent_diffusion": LatentDiffusionConfig,
    "autoencoder": AutoencoderConfig,
    "imagen": ImagenConfig,
    "flow": FlowConfig,
}


@dataclass
class DataConfig:
    """Training data: webdataset shards (paths, globs, brace patterns) or an image folder."""

    train: list[str] = field(default_factory=list)
    resolution: int = 256
    center_crop: bool = True
    random_flip: bool = False
    batch_size: int = 4
    num_workers: int = 0
    shuffle_buffer: int = 1000
    # where a sample's caption is, first match wins: a tar member extension, `json:FIELD` (a field of the
    # sample's .json, as img2dataset writes it), or for image folders a metadata.jsonl column
    caption_key: list[str] | str = field(default_factory=lambda: ["txt", "json:caption", "caption", "text"])
    max_image_pixels: int | None = 8192 * 8192  # larger images are skipped and counted (null: no limit)

    def __post_init__(self) -> None:
        if isinstance(self.train, str):  # `data.train=shards/` on the command line means a one-item list
            self.train = [self.train]
        if isinstance(self.caption_key, str):
            self.caption_key = [self.caption_key]

    def check(self, key: str) -> None:
        _require(bool(self.caption_key) and all(self.caption_key), f"{key}.caption_key", self.caption_key,
                 "a non-empty list such as [txt, json:caption]")
        if self.max_image_pixels is not None:
            _require(self.max_image_pixels >= 1, f"{key}.max_image_pixels", self.max_image_pixels,
                     "null or an integer >= 1")
        _require(self.resolution >= 1, f"{key}.resolution", self.resolution, "an integer >= 1")
        _require(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "an integer >= 1")
        _require(self.num_workers >= 0, f"{key}.num_workers", self.num_workers, "an integer >= 0")


@dataclass
class EMAConfig:
    """Exponential moving average of the model weights; sampling and export use it."""

    enabled: bool = True
    decay: float = 0.9999
    start_step: int = 0
    warmup: bool = True  # decay min(decay, (1 + n) / (10 + n)) at the n-th averaged step, as diffusers' EMAModel

    def check(self, key: str) -> None:
        _require(0 <= self.decay < 1, f"{key}.decay", self.decay, "a number in [0, 1)")
        _require(self.start_step >= 0, f"{key}.start_step", self.start_step, "an integer >= 0")


_PRECISION_ALIASES = {32: "32", "32-true": "32", "fp32": "32", 16: "fp16", "16": "fp16", "16-mixed": "fp16",
                      "bf16-mixed": "bf16"}


@dataclass
class SampleConfig:
    """How the run samples its previews and evaluation (and, for Imagen stages, the exported defaults); null
    fields take the family's defaults (SD: ddim, 25 steps, guidance 4; Imagen: the preconditioning's sampler,
    30 steps, guidance 4)."""

    sampler: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None

    def check(self, key: str) -> None:
        if self.steps is not None:
            _require(self.steps >= 1, f"{key}.steps", self.steps, "null or an integer >= 1")
        if self.guidance_scale is not None:
            _require(math.isfinite(self.guidance_scale), f"{key}.guidance_scale", self.guidance_scale,
                     "null or a finite number")  # fmt: skip


@dataclass
class TrainerConfig:
    """The generic training loop's knobs (see t2i.train.trainer)."""

    precision: Literal["32", "bf16", "fp16"] = field(default="32", metadata={"aliases": _PRECISION_ALIASES})
    strategy: Literal["ddp", "fsdp"] = "ddp"
    max_steps: int = 1000
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    log_every: int = 10
    sample_every: int = 200
    sample_prompts: list[str] = field(default_factory=list)
    sample: SampleConfig = field(default_factory=SampleConfig)
    checkpoint_every: int = 500
    keep_last: int = 3
    out_dir: str = "runs/${name}"
    resume: str | None = None
    progress_bar: bool = True
    ema: EMAConfig = field(default_factory=EMAConfig)

    def check(self, key: str) -> None:
        for name in ("max_steps", "grad_accum", "keep_last"):
            _require(getattr(self, name) >= 1, f"{key}.{name}", getattr(self, name), "an integer >= 1")
        for name in ("log_every", "sample_every", "checkpoint_every"):
            _require(getattr(self, name) >= 0, f"{key}.{name}", getattr(self, name), "an integer >= 0 (0 = never)")
        if self.grad_clip is not None:
            _require(self.grad_clip >= 0, f"{key}.grad_clip", self.grad_clip, "null or a number >= 0 (0 = off)")


@dataclass
class RunConfig:
    """A whole run: `model.kind` picks the model schema; `trainer.out_dir` defaults to runs/<name>."""

    name: str = "run"
    seed: int = 0
    model: ModelConfig = field(default_factory=LatentDiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
