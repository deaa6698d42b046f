"""The whole run: `model.kind` picks the model schema; data, trainer and the `RunConfig` that holds them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

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
class BucketConfig:
    """Aspect-ratio buckets (NovelAI / SDXL; `t2i.data.buckets`): (width, height) multiples of `step` in
    [min_size, max_size] with area <= `max_area` (null = data.resolution squared); per width the largest height
    (kohya-ss / NovelAI), or with `min_area` every pair of area in [min_area, max_area] (SDXL's table: max_area
    1048576, min_area 943718, min_size 512, max_ratio 4). Each image goes to the bucket nearest its aspect, is
    resized to cover it and cropped (the crop is recorded for SDXL's size conditioning); every batch is one bucket.
    `log_counts` scans the image headers at start and prints the number of images per bucket."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"bucket_reso_steps": "step", "min_bucket_reso": "min_size",
                                              "max_bucket_reso": "max_size"}  # kohya-ss names
    max_area: int | None = None
    step: int = 64
    min_size: int = 256
    max_size: int = 2048
    max_ratio: float | None = 4.0
    min_area: int | None = None
    log_counts: bool = True

    def check(self, key: str) -> None:
        _require(self.step >= 1, f"{key}.step", self.step, "an integer >= 1")
        _require(self.min_size >= 1 and self.min_size % self.step == 0, f"{key}.min_size", self.min_size,
                 f"a positive multiple of step {self.step}")  # fmt: skip
        _require(self.max_size >= self.min_size, f"{key}.max_size", self.max_size, f">= min_size {self.min_size}")
        if self.max_area is not None:
            _require(self.max_area >= self.min_size**2, f"{key}.max_area", self.max_area,
                     f"null or >= min_size^2 = {self.min_size**2}")  # fmt: skip
        if self.max_ratio is not None:
            _require(self.max_ratio >= 1, f"{key}.max_ratio", self.max_ratio, "null or a number >= 1")
        if self.min_area is not None:
            _require(self.min_area >= 1, f"{key}.min_area", self.min_area, "null or an integer >= 1")

    def area(self, resolution: int) -> int:
        """The maximum bucket area for a run at `resolution`."""
        return self.max_area if self.max_area is not None else resolution**2


@dataclass
class DataConfig:
    """Training data: webdataset shards (paths, globs, brace patterns) or an image folder; `buckets` null = every
    image resized and cropped to a `resolution` square."""

    train: list[str] = field(default_factory=list)
    resolution: int = 256
    center_crop: bool = True
    random_flip: bool = False
    batch_size: int = 4
    num_workers: int = 0
    shuffle_buffer: int = 1000
    # keep every shard's raw samples in memory after the first epoch (same order and results; no tar parsing on
    # later epochs): for small sets such as precached latents, which each DataLoader worker then holds once
    cache_in_memory: bool = False
    # where a sample's caption is, first match wins: a tar member extension, `json:FIELD` (a field of the
    # sample's .json, as img2dataset writes it), or for image folders a metadata.jsonl column
    caption_key: list[str] | str = field(default_factory=lambda: ["txt", "json:caption", "caption", "text"])
    max_image_pixels: int | None = 8192 * 8192  # larger images are skipped and counted (null: no limit)
    buckets: BucketConfig | None = None

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
        if self.buckets is not None and self.buckets.max_area is None:
            _require(self.resolution >= self.buckets.min_size, f"{key}.buckets.min_size", self.buckets.min_size,
                     f"<= data.resolution {self.resolution} (or set data.buckets.max_area)")  # fmt: skip


@dataclass
class EMAConfig:
    """Exponential moving average of the model weights; sampling and export use it."""

    enabled: bool = True
    decay: float = 0.9999
    start_step: int = 0
    warmup: bool = True  # decay min(decay, (1 + n) / (10 + n)) at the n-th averaged step, as diffusers' EMAModel
    # where the shadow lives: null = beside the model; `cpu` keeps it in host memory (frees 4 bytes per parameter
    # of accelerator memory, costs one device-to-host copy of the weights per update)
    device: Literal["cpu"] | None = None
    # fold the live weights in every N optimizer steps (with decay^N), which amortises a CPU shadow's copy
    update_every: int = 1

    def check(self, key: str) -> None:
        _require(0 <= self.decay < 1, f"{key}.decay", self.decay, "a number in [0, 1)")
        _require(self.start_step >= 0, f"{key}.start_step", self.start_step, "an integer >= 0")
        _require(self.update_every >= 1, f"{key}.update_every", self.update_every, "an integer >= 1")


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
    height: int | None = None  # null = data.resolution (SD family; set both to sample a non-square bucket)
    width: int | None = None

    def check(self, key: str) -> None:
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                _require(getattr(self, name) >= 1, f"{key}.{name}", getattr(self, name), "null or an integer >= 1")
        if self.steps is not None:
            _require(self.steps >= 1, f"{key}.steps", self.steps, "null or an integer >= 1")
        if self.guidance_scale is not None:
            _require(math.isfinite(self.guidance_scale), f"{key}.guidance_scale", self.guidance_scale,
                     "null or a finite number")  # fmt: skip


@dataclass
class EvalConfig:
    """`trainer.eval_every` evaluation (captioned-shapes runs): the analytic judge's accuracy on every prompt of
    `split` for each of `seeds`, and with `fid` the judge-feature FID/KID against `reference_per_prompt` dataset
    renderings per prompt. Logged to TensorBoard (`eval/...`), `OUT/eval.json` and `OUT/eval.png`."""

    split: Literal["heldout", "train"] = "heldout"
    task: Literal["single", "two-objects"] = "single"  # two-objects: binding accuracy on the pair scenes, no FID
    seeds: list[int] = field(default_factory=lambda: [0])
    fid: bool = True
    reference_per_prompt: int = 4

    def check(self, key: str) -> None:
        _require(bool(self.seeds), f"{key}.seeds", self.seeds, "at least one seed")
        _require(self.reference_per_prompt >= 1, f"{key}.reference_per_prompt", self.reference_per_prompt,
                 "an integer >= 1")  # fmt: skip


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
    eval_every: int = 0  # 0 = never; see `eval`
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint_every: int = 500
    keep_last: int = 3
    out_dir: str = "runs/${name}"
    resume: str | None = None
    progress_bar: bool = True
    ema: EMAConfig = field(default_factory=EMAConfig)

    def check(self, key: str) -> None:
        for name in ("max_steps", "grad_accum", "keep_last"):
            _require(getattr(self, name) >= 1, f"{key}.{name}", getattr(self, name), "an integer >= 1")
        for name in ("log_every", "sample_every", "eval_every", "checkpoint_every"):
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
