"""The `DiffusionTask` interface the generic training loop sees, and the `model.kind` -> task registry.

The trainer knows nothing about UNets, VAEs or text encoders. It builds a task from the config
(`build_task(cfg)`), asks it for data, trainable parameters and a scalar loss per batch, and everything else
(optimizer, EMA, precision, checkpoints, logging, DDP) is the loop's business.

A task module registers its factory with the decorator:

    @register_task("latent_diffusion")
    def build_latent_task(cfg: RunConfig) -> DiffusionTask: ...

`build_task` imports the module named in `TASK_MODULES[kind]` on first use, so registration needs no import
side effects elsewhere.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from t2i.errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image

    from t2i.config import RunConfig
    from t2i.train.ema import EMA


class DiffusionTask(nn.Module):
    """A trainable model family as seen by the loop. Subclass it and implement the abstract methods.

    Calling the task (`task(batch, generator)`) runs `training_loss`; the loop calls it that way so that a
    DistributedDataParallel / FSDP wrapper around the task sees the forward pass. Parameters with
    `requires_grad=False` (frozen VAE, text encoder) are ignored by the optimizer and by DDP's gradient sync.

    Methods the loop calls:
    - `build_dataloader(cfg, rank, world_size) -> Iterable[dict]`: the batches of rank `rank` out of
      `world_size` (each rank must read a disjoint share). Iterating it again starts a new epoch. If the
      iterable (or its `.dataset`) has `state_dict()` / `load_state_dict(state)`, the data position is saved
      in checkpoints (state made of tensors, numbers, strings, lists and dicts only); otherwise the loop
      resumes by skipping the batches already consumed.
    - `trainable_parameters() -> list[Parameter]`: what AdamW optimises (default: every parameter that
      requires grad).
    - `training_loss(batch, generator) -> Tensor`: scalar loss of one micro-batch. All randomness (noise,
      timesteps, caption dropout) must come from `generator` (a `torch.Generator` on the training device) so
      that runs are reproducible and resumable exactly.
    - `sample_images(prompts, seed) -> list[PIL.Image]`: one image per prompt for progress grids. The loop
      calls it in eval mode, under `torch.no_grad()`, with the EMA weights swapped in.
    - `model_state_dict() -> dict[str, Tensor]`: the weights that are checkpointed, EMA-averaged and exported
      (e.g. the UNet only, or only the LoRA weights; not frozen encoders). Default: the trainable parameters.
    - `load_model_state_dict(state)`: the inverse (strict on the keys).
    - `export(out_dir, use_ema=True) -> Path`: write an inference folder (pipeline format). Use
      `with self.ema_weights(use_ema): ...` so the EMA weights are exported when the loop attached one.
    - `data_stats() -> dict[str, int | float]`: counters logged as `data/<name>`, e.g. `{"skipped": 3}`.
    - `prepare_for_training(cfg, device)`: hook run once after construction, before DDP wrapping: moves the
      task to `device` and applies `model.channels_last` and `model.inductor` (`torch.compile` of the modules
      from `compile_targets()`). Activation checkpointing is a model-config flag applied at build time.
    """

    ema: EMA | None = None  # attached by the trainer or by checkpoint loading; see ema_weights()

    def build_dataloader(self, cfg: RunConfig, rank: int, world_size: int) -> Iterable[dict[str, Any]]:
        raise NotImplementedError(f"{type(self).__name__}.build_dataloader")

    def training_loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__}.training_loss")

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        return self.training_loss(batch, generator)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def sample_images(self, prompts: list[str], seed: int) -> list[Image.Image]:
        raise NotImplementedError(f"{type(self).__name__}.sample_images")

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.model_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            from t2i.errors import WeightsMismatchError

            raise WeightsMismatchError(
                f"model weights: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
            )
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(state[name])

    def export(self, out_dir: str | Path, use_ema: bool = True) -> Path:
        raise NotImplementedError(f"{type(self).__name__}.export")

    def data_stats(self) -> dict[str, int | float]:
        return {}

    def compile_targets(self) -> list[nn.Module]:
        """Sub-modules compiled in place (`module.compile()`, keeps state-dict keys) when model.inductor."""
        return []

    def prepare_for_training(self, cfg: RunConfig, device: torch.device) -> None:
        self.to(device)
        if getattr(cfg.model, "channels_last", False):
            self.to(memory_format=torch.channels_last)
        if getattr(cfg.model, "inductor", False):
            for module in self.compile_targets():
                module.compile()

    @contextlib.contextmanager
    def ema_weights(self, enabled: bool = True) -> Iterator[None]:
        """Temporarily load the attached EMA weights into the model (no-op without EMA or when disabled)."""
        if not enabled or self.ema is None:
            yield
            return
        live = {k: v.detach().clone() for k, v in self.model_state_dict().items()}
        self.load_model_state_dict(self.ema.shadow)
        try:
            yield
        finally:
            self.load_model_state_dict(live)


TaskFactory = Callable[["RunConfig"], DiffusionTask]
_TASKS: dict[str, TaskFactory] = {}
TASK_MODULES = {
    "latent_diffusion": "t2i.train.tasks.latent",
    "autoencoder": "t2i.train.tasks.autoencoder",
    "imagen": "t2i.train.tasks.imagen",
    "flow": "t2i.train.tasks.flow",
}


def register_task(kind: str) -> Callable[[TaskFactory], TaskFactory]:
    """Decorator: `@register_task("imagen")` on a `factory(cfg) -> DiffusionTask`."""

    def decorate(factory: TaskFactory) -> TaskFactory:
        _TASKS[kind] = factory
        return factory

    return decorate


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch's global generators (model initialisation draws from torch's)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_task(cfg: RunConfig) -> DiffusionTask:
    """The task for `cfg.model.kind`, importing its module on first use. Its weights are initialised from
    `cfg.seed`, so the same config builds the same model in every process."""
    seed_everything(cfg.seed)
    kind = cfg.model.kind
    if kind not in _TASKS and kind in TASK_MODULES:
        try:
            importlib.import_module(TASK_MODULES[kind])
        except ModuleNotFoundError as err:
            if not f"{TASK_MODULES[kind]}.".startswith(f"{err.name}."):
                raise  # the task module exists but one of its own imports failed
    if kind not in _TASKS:
        raise ConfigError(f"model.kind: no training task registered for {kind!r} "
                          f"(registered: {', '.join(sorted(_TASKS)) or 'none'})")
    return _TASKS[kind](cfg)
