"""`DenoisingTask`: what every diffusion family's training task shares, and the seam the LoRA and prior
preservation wrappers (`t2i.train.tasks.adapters`) build on.

A family provides four things and inherits the rest:

    backbone                       the trained network (UNet, transformer)
    denoiser(net=None)             the backbone (or `net` in its place) under the family's denoiser adapter
    encode_batch(batch, generator) -> (x0 (B, ...) in model space, cond): first stage + conditioner step
    pipeline()                     an inference pipeline over the task's own modules (previews, class images)

and sets `self.loss` (a `t2i.diffusion.losses` loss: `loss(denoiser, x0, cond, generator) -> (B,)`) and
`self.conditioner` (`t2i.text.conditioner.Conditioner`). The loss is then `loss(denoiser(), *encode_batch(batch))`
averaged over the batch, previews sample through `pipeline()` with `trainer.sample`, and a wrapper can swap the
denoiser's network (the frozen base, for distillation) or add terms to the loss without knowing the family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.config import RunConfig
from t2i.errors import ConfigError
from t2i.train.task import DiffusionTask
from t2i.train.tasks import ObservedLoader


class DenoisingTask(DiffusionTask):
    """Base class of the diffusion families' tasks (see the module docstring for what a subclass provides)."""

    cfg: RunConfig
    loss: Any
    conditioner: Any
    precached: bool = False
    # data.buckets: aspect-ratio bucketing (latent families); micro_conditioning: batches carry the recorded
    # sizes and crop (`t2i.data.buckets.MICRO_CONDITIONING`) even without buckets (SDXL); latent_factor: pixels
    # per latent cell
    supports_buckets: bool = False
    micro_conditioning: bool = False
    latent_factor: int = 1
    # sampling defaults of the family, used where `trainer.sample` leaves a field null
    default_sample_steps: int = 25
    default_guidance_scale: float = 4.0

    def __init__(self) -> None:
        super().__init__()
        self._data: ObservedLoader | None = None

    # ------------------------------------------------------------------------------------ the family's part

    @property
    def backbone(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__}.backbone")

    def denoiser(self, net: nn.Module | None = None) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__}.denoiser")

    def encode_batch(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError(f"{type(self).__name__}.encode_batch")

    def pipeline(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.pipeline")

    def sample_model_space(
        self, prompts: list[str], seed: int, num_images: int, steps: int, guidance_scale: float
    ) -> torch.Tensor:
        """Samples (len(prompts) * num_images, ...) in the space the loss sees x0 in (class images of priors)."""
        raise NotImplementedError(f"{type(self).__name__}.sample_model_space")

    def check_prior_preservation(self) -> None:
        """Raise ConfigError when this task cannot draw class samples for prior preservation."""

    def adapter_components(self) -> dict[str, nn.Module]:
        """{LoRA file prefix: module} of the modules that take adapters (default: the backbone as `unet`)."""
        return {"unet": _uncompiled(self.backbone)}

    # ------------------------------------------------------------------------------------ shared behaviour

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def training_loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """Mean loss of one batch; the randomness order is the family's encode_batch, then the loss's draws."""
        x0, cond = self.encode_batch(batch, generator)
        return self.loss(self.denoiser(), self.channels_last(x0), cond, generator).float().mean()

    def channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """x in channels_last memory format when `model.channels_last` asks for it."""
        if getattr(self.cfg.model, "channels_last", False) and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def check_sizes(self, backbone_factor: int, backbone: str) -> None:
        """ConfigError unless the training sizes are multiples of the first stage's `latent_factor` x the
        backbone's `backbone_factor` (its total downsampling, or a transformer's patch): the bucket step with
        `data.buckets`, else `data.resolution`."""
        from t2i.train.bucketing import check_bucket_step

        multiple = self.latent_factor * backbone_factor
        check_bucket_step(self.cfg.data, multiple)
        if self.cfg.data.buckets is not None:
            return
        resolution, why = self.cfg.data.resolution, f"first stage x{self.latent_factor} * {backbone}"
        if resolution % multiple:
            lower, upper = max(multiple, resolution // multiple * multiple), (resolution // multiple + 1) * multiple
            raise ConfigError(
                f"data.resolution: {resolution} is not a multiple of {multiple} ({why}); use {lower} or {upper}"
            )

    def sample_settings(self) -> dict[str, Any]:
        """`trainer.sample` with the family's defaults filled in: {sampler, steps, guidance_scale}."""
        s = self.cfg.trainer.sample
        return {
            "sampler": s.sampler,
            "steps": s.steps if s.steps is not None else self.default_sample_steps,
            "guidance_scale": s.guidance_scale if s.guidance_scale is not None else self.default_guidance_scale,
        }

    def build_dataloader(self, cfg: RunConfig, rank: int, world_size: int) -> ObservedLoader:
        """Endless batches of this rank's share of `data.train` (image shards or precached shards)."""
        d = cfg.data
        common = {"seed": cfg.seed, "rank": rank, "world_size": world_size, "shuffle_buffer": d.shuffle_buffer,
                  "repeat": True, "cache_in_memory": d.cache_in_memory}  # fmt: skip
        from t2i.train import bucketing

        if d.buckets is not None and not self.supports_buckets:
            raise ConfigError(f"data.buckets: {type(self).__name__} trains at one square resolution; expected null")
        if self.precached:
            from t2i.data.precached import build_precached_dataset

            dataset = build_precached_dataset(d.train, **common)
        else:
            from t2i.data.readers import build_dataset

            transform = bucketing.image_transform(d, self.micro_conditioning)
            dataset = build_dataset(d.train, d.resolution, d.center_crop, d.random_flip, transform=transform,
                                    caption_keys=d.caption_key, max_image_pixels=d.max_image_pixels, **common)
        batches = bucketing.batched(dataset, d)
        if batches is not None and rank == 0:
            bucketing.print_census(dataset, d, self.precached, self.latent_factor)
        if batches is None:
            self._data = ObservedLoader(dataset, d.batch_size, d.num_workers, cfg.seed)
        else:  # the batcher collates its own single-bucket batches
            self._data = ObservedLoader(batches, None, d.num_workers, cfg.seed)
        return self._data

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach() for name, t in _uncompiled(self.backbone).state_dict().items()}

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from t2i.models.autoencoder import load_state_dict_strict

        load_state_dict_strict(_uncompiled(self.backbone), dict(state), f"{type(self.backbone).__name__} state")

    def compile_targets(self) -> list[nn.Module]:
        return [self.backbone]

    def data_stats(self) -> dict[str, int | float]:
        return self._data.data_stats() if self._data is not None else {}

    def export(self, out_dir: str | Path, use_ema: bool = True) -> Path:
        raise NotImplementedError(f"{type(self).__name__}.export")


def _uncompiled(module: nn.Module) -> nn.Module:
    return getattr(module, "_orig_mod", module)
