"""Schemas every trainable model kind shares: the optimiser and its schedule, LoRA and prior preservation."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from t2i.config.validation import require as _require


@dataclass
class SchedConfig:
    """Learning-rate schedule: linear warmup from 0, then constant or cosine decay to `min_lr` at max_steps."""

    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0

    def check(self, key: str) -> None:
        _require(self.warmup_steps >= 0, f"{key}.warmup_steps", self.warmup_steps, "an integer >= 0")
        _require(self.min_lr >= 0, f"{key}.min_lr", self.min_lr, "a number >= 0")


@dataclass
class OptimConfig:
    """AdamW hyper-parameters, its implementation and the LR schedule."""

    lr: float = 1.0e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    weight_decay: float = 0.01
    sched: SchedConfig = field(default_factory=SchedConfig)
    # torch.optim.AdamW's implementation: `fused` (one kernel for all parameters; CUDA, and CPU in recent torch)
    # or `foreach` (multi-tensor ops); null = torch's default (foreach on CUDA). Both only change speed and
    # peak memory, not the update.
    fused: bool | None = None
    foreach: bool | None = None

    def check(self, key: str) -> None:
        _require(not (self.fused and self.foreach), f"{key}.fused", self.fused,
                 "not true together with foreach: true (pick one implementation)")  # fmt: skip
        _require(self.lr > 0, f"{key}.lr", self.lr, "a number > 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{key}.betas", self.betas,
                 "two numbers in [0, 1)")
        _require(self.eps > 0, f"{key}.eps", self.eps, "a number > 0")


PriorLoss = Literal["diffusion", "distill"]
PRIOR_LOSSES: tuple[str, ...] = typing.get_args(PriorLoss)


@dataclass
class LoraPriorConfig:
    """Prior preservation: `num_images` class images per prompt of `class_prompts`, drawn once by the frozen base
    (`steps`, `guidance_scale`); each step adds `loss_weight` x the `loss` on a batch of them (`diffusion`:
    DreamBooth's; `distill`: match the frozen base's prediction)."""

    class_prompts: list[str] = field(default_factory=list)
    num_images: int = 8
    loss_weight: float = 1.0
    loss: PriorLoss = "diffusion"
    steps: int = 25
    guidance_scale: float = 4.0
    # share of each prior batch conditioned on the unconditional text (SD: "", Imagen: none), so that the
    # branch classifier-free guidance subtracts is preserved too
    unconditional_share: float = 0.0

    def check(self, key: str) -> None:
        _require(0 <= self.unconditional_share <= 1, f"{key}.unconditional_share", self.unconditional_share,
                 "a number in [0, 1]")  # fmt: skip
        _require(bool(self.class_prompts), f"{key}.class_prompts", self.class_prompts, "at least one prompt")
        _require(self.num_images >= 1, f"{key}.num_images", self.num_images, "an integer >= 1")
        _require(self.loss_weight >= 0, f"{key}.loss_weight", self.loss_weight, "a number >= 0")
        _require(self.steps >= 1, f"{key}.steps", self.steps, "an integer >= 1")


LoraType = Literal["lora", "loha", "lokr"]
LORA_TYPES: tuple[str, ...] = typing.get_args(LoraType)


@dataclass
class LoraConfig:
    """Low-rank adapters on the backbone's attention projections (`target_modules` None = the task's default),
    optionally on the text encoder's attention too (SD family), with optional prior preservation.

    `type`: `lora` (B A), `loha` (LyCORIS' Hadamard product of two rank-`rank` products) or `lokr` (a Kronecker
    product, the larger factor of rank `rank`), trained through peft; `dora` makes a LoRA weight-decomposed
    (DoRA: a learnt magnitude per output row)."""

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    train_text_encoder: bool = False
    prior: LoraPriorConfig | None = None
    type: LoraType = "lora"
    dora: bool = False

    def check(self, key: str) -> None:
        _require(self.rank >= 1, f"{key}.rank", self.rank, "an integer >= 1")
        _require(0 <= self.dropout < 1, f"{key}.dropout", self.dropout, "a number in [0, 1)")
        _require(self.type == "lora" or not self.dora, f"{key}.dora", self.dora,
                 f"false with type {self.type} (DoRA is trained on type lora)")  # fmt: skip
        _require(self.type == "lora" or self.dropout == 0, f"{key}.dropout", self.dropout,
                 f"0 with type {self.type} (peft's LoHa/LoKr have no input dropout)")  # fmt: skip
