"""Imagen training task (`model.kind: imagen`): one cascade stage in pixel space, base or super-resolution.

Data paths, chosen by `model.conditioning`:
- online (`online_encoding: true`, no `precached_key`): image shards; captions run through the frozen text
  encoder (`encoder_kind`, `encoder_path`) on every step;
- precached (`precached_key` set, `online_encoding` false/null): shards written by `t2i.train.precache.precache_imagen` hold the
  pixels (`image_encoded.mean`, the identity first stage's moments) and the token embeddings + mask.
Images are resized to `unet.image_size` (area filter); an SR stage's low-res input is the same image shrunk to
`conditioning.low_res_size` with the area filter, then noise-augmented (NeMo's noise conditioning augmentation):
under EDM a level sigma_aug from the training log-normal per sample (or per batch), x_low = c_in(sigma_aug) *
(x_low + sigma_aug * n) and aug_cond = ln(sigma_aug) / 4; under DDPM a continuous time t_aug.

Classifier-free guidance: with probability `drop_rate` a sample's text embedding AND mask are zeroed (the
conditioner's dropout step), which is exactly the unconditional branch the cascade pipeline uses at sampling.

Fine-tuning: `model.from_pretrained` (an exported stage folder, or a run folder holding one under `export/`)
initialises the UNet, whose architecture keys must match it (a mismatch names the keys). `model.lora` wraps the
task in LoRA (and prior preservation), as for every family (`t2i.train.tasks.adapters`).

Training optimisations are config flags: `trainer.precision: bf16`, `model.unet.gradient_checkpointing`,
`model.unet.flash_attention`, `model.channels_last`, `model.inductor` (torch.compile of the backbone).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.config import EDMConfig, RunConfig
from t2i.diffusion.losses import ContinuousDDPMLoss, EDMLoss
from t2i.errors import ConfigError
from t2i.pipelines.imagen_stage import DEFAULT_SAMPLERS, ImagenStage, StageDefaults, resize_images, save_stage
from t2i.text.conditioner import Conditioner
from t2i.train.task import register_task
from t2i.train.tasks.denoising import DenoisingTask, _uncompiled


class ImagenTask(DenoisingTask):
    """One Imagen stage trained with EDM or continuous-DDPM preconditioning.

    Batches: `{"images" (B, 3, H, W) in [-1, 1], "captions": list[str]}` online, or
    `{"image_encoded": {"mean" (B, 3, H, W), ...}, "captions_encoded": {"embeddings" (B, T, D), "mask" (B, T)}}`
    precached. `trainer.sample` sets the sampling settings of previews and of the exported stage.json.
    """

    default_sample_steps = 30

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        if cfg.model.kind != "imagen":
            raise ConfigError(f"model.kind: {cfg.model.kind!r}; ImagenTask needs imagen")
        self.cfg = cfg
        self.stage = ImagenStage(cfg.model)
        self.settings = self.stage.settings
        self.loss = build_loss(self.settings.preconditioning)
        if cfg.model.from_pretrained is not None:
            load_pretrained_stage_weights(self.unet, cfg.model.from_pretrained)
        self.precached = not self.settings.conditioning.online
        self._lazy: dict[str, nn.Module] = {}
        if not self.precached:
            self.text_encoder = self._build_text_encoder()
        self.conditioner = Conditioner(
            [self.stage.text_embedder(self.frozen_text_encoder, self.settings.conditioning.drop_rate)]
        )
        self._preview: dict[str, torch.Tensor] = {}  # low-res images of a training batch, for SR previews

    @property
    def unet(self) -> nn.Module:
        return self.stage.unet

    @property
    def backbone(self) -> nn.Module:
        return self.stage.unet

    @property
    def defaults(self) -> StageDefaults:
        """The stage's sampling defaults: `trainer.sample`, else the preconditioning's sampler, 30 steps, CFG 4."""
        s = self.sample_settings()
        sampler = s["sampler"] or DEFAULT_SAMPLERS[self.settings.preconditioning_type]
        return StageDefaults(sampler=sampler, steps=s["steps"], guidance_scale=s["guidance_scale"])

    def _build_text_encoder(self) -> nn.Module:
        from t2i.text.encoders import build_text_encoder

        c = self.settings.conditioning
        encoder = build_text_encoder(c.encoder_kind, c.encoder_path, max_length=c.token_length)
        if encoder.dim != c.embed_dim:
            raise ConfigError(
                f"model.conditioning.embed_dim: {c.embed_dim}, but the {c.encoder_kind} encoder "
                f"gives {encoder.dim}-d embeddings"
            )
        return encoder

    def frozen_text_encoder(self) -> nn.Module:
        """The text encoder (built on first use when training from precached shards)."""
        if not self.precached:
            return self.text_encoder
        if "text_encoder" not in self._lazy:
            self._lazy["text_encoder"] = self._build_text_encoder().to(self.device)
        return self._lazy["text_encoder"]

    def denoiser(self, net: nn.Module | None = None) -> nn.Module:
        return self.stage.denoiser(net)

    # ------------------------------------------------------------------------------------ data

    def encode_batch(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Images at the stage's size and the cond; randomness order: text drop, low-res augmentation."""
        key = "images" if "images" in batch else None
        images = (batch[key] if key else batch["image_encoded"]["mean"]).to(self.device).float()
        cond = self.conditioner(batch, generator, self.device)
        if self.settings.is_sr:
            cond |= self.low_res_training_cond(images, generator)
        return resize_images(images, self.settings.image_size), cond

    def low_res_training_cond(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The SR stage's conditioning from full-size training images: shrink, then noise-augment."""
        from t2i.diffusion.noise_aug import augment_low_res

        s = self.settings
        low_res = resize_images(images, s.low_res_size)
        self._preview = {"low_res": low_res[:8].detach()}
        per_sample, options = s.noise_aug.per_sample, self.train_aug_options()
        return self.stage.augmented(low_res, lambda x: augment_low_res(x, generator=generator, per_sample=per_sample,
                                                                       **options))  # fmt: skip

    def train_aug_options(self) -> dict[str, Any]:
        """How training draws the augmentation level: EDM's log-normal, or t in [0, max_level] under DDPM."""
        p = self.settings.preconditioning
        options = self.stage.aug_options()
        if isinstance(p, EDMConfig):
            return options | {"p_mean": p.p_mean, "p_std": p.p_std}
        return options | {"max_level": self.settings.noise_aug.max_level}

    # ------------------------------------------------------------------------------------ sampling, export

    def pipeline(self) -> Any:
        """A one-stage `CascadePipeline` over the live stage."""
        from t2i.pipelines.cascade import CascadePipeline

        return CascadePipeline([self.stage], [self.defaults], [self.frozen_text_encoder()])

    def preview_low_res(self, count: int) -> torch.Tensor | None:
        """Low-res inputs for an SR stage's previews: images of a recent training batch, cycled."""
        if not self.settings.is_sr:
            return None
        if "low_res" not in self._preview:
            raise ConfigError(
                "trainer.sample_every: an SR stage previews after its first training batch; "
                "expected sample_every > 0 steps"
            )
        bank = self._preview["low_res"]
        return bank[torch.arange(count) % bank.shape[0]]

    @torch.no_grad()
    def sample_images(self, prompts: list[str], seed: int, **settings: Any) -> list[Any]:
        """One PIL image per prompt. An SR stage upsamples low-res images of a recent training batch (cycled),
        since it has no base stage of its own."""
        options = {k: v for k, v in settings.items() if v is not None}
        low_res = self.preview_low_res(len(prompts))
        return self.pipeline().generate(list(prompts), seed=seed, low_res=low_res, **options).images

    def check_prior_preservation(self) -> None:
        if self.settings.is_sr:
            raise ConfigError(
                "model.lora.prior: base stages only (an SR stage's class images would need low-res inputs); "
                "set prior: null for this stage"
            )

    @torch.no_grad()
    def sample_model_space(
        self, prompts: list[str], seed: int, num_images: int, steps: int, guidance_scale: float
    ) -> torch.Tensor:
        self.check_prior_preservation()
        out = self.pipeline().generate(
            list(prompts), num_images=num_images, seed=seed, steps=steps, guidance_scale=guidance_scale
        )
        return (out.pixels.to(self.device) * 2 - 1).float()

    def lora_metadata(self) -> dict[str, Any]:
        """What a LoRA file records about the stage it was trained on (`load_lora` on a cascade reads it)."""
        return {"unet_type": self.settings.unet_type, "image_size": self.settings.image_size}

    def export(self, out_dir: str | Path, use_ema: bool = True) -> Path:
        """Write an Imagen stage folder (model.safetensors, config.yaml, stage.json) with the (EMA) weights."""
        with self.ema_weights(use_ema):
            unet = copy.deepcopy(_uncompiled(self.unet)).float().cpu()
        return save_stage(out_dir, unet, self.cfg, self.defaults)


def stage_folder(path: str | Path) -> Path:
    """A stage folder, or a run folder's exported stage (`export/`)."""
    from t2i.pipelines.imagen_stage import WEIGHTS_NAME

    path = Path(path)
    if path.is_dir() and not (path / WEIGHTS_NAME).is_file() and (path / "export" / WEIGHTS_NAME).is_file():
        return path / "export"
    return path


def load_pretrained_stage_weights(unet: nn.Module, source: str | Path) -> None:
    """Initialise `unet` from the stage folder `source` (strict: the architecture must be the same)."""
    from safetensors.torch import load_file

    from t2i.pipelines.imagen_stage import WEIGHTS_NAME, load_unet_strict

    weights = stage_folder(source) / WEIGHTS_NAME
    if not weights.is_file():
        raise ConfigError(
            f"model.from_pretrained: {source} has no {WEIGHTS_NAME}; expected an exported Imagen stage folder "
            "(or a run folder with one under export/)"
        )
    load_unet_strict(unet, load_file(str(weights)), f"model.from_pretrained ({weights})")


def build_loss(p: Any) -> EDMLoss | ContinuousDDPMLoss:
    """The training loss of the stage's preconditioning (EDM or continuous DDPM)."""
    if isinstance(p, EDMConfig):
        return EDMLoss(p_mean=p.p_mean, p_std=p.p_std, sigma_data=p.sigma_data, loss_type=p.loss_type)
    return ContinuousDDPMLoss(loss_type=p.loss_type)


@register_task("imagen")
def build_imagen_task(cfg: RunConfig) -> DenoisingTask:
    """Factory registered for `model.kind: imagen`; `model.lora` wraps the stage in LoRA (needs from_pretrained)."""
    if cfg.model.lora is None:
        return ImagenTask(cfg)
    if cfg.model.from_pretrained is None:
        raise ConfigError(
            "model.from_pretrained: missing; LoRA training needs the base stage (an exported Imagen stage "
            "folder or a t2i run folder)"
        )
    if cfg.model.lora.train_text_encoder:
        raise ConfigError(
            "model.lora.train_text_encoder: the SD family only; an Imagen stage's LoRA trains on its UNet with "
            "the frozen text encoder, so set train_text_encoder: false"
        )
    from t2i.train.tasks.adapters import wrap_with_adapters

    return wrap_with_adapters(ImagenTask(cfg), cfg)
