"""Stable Diffusion training task: a UNet trained in the latent space of a frozen VAE, conditioned on a frozen
text encoder.

Two data paths, chosen by the config:
- online (`first_stage_key: images`, `cond_stage_key: captions`): batches of images in [-1, 1] and captions;
  the frozen VAE encoder and text encoder run on every step;
- precached (`first_stage_key: image_encoded`, `cond_stage_key: captions_encoded`): shards written by
  `t2i precache` hold the VAE moments and the per-token text embeddings, so neither encoder is loaded for the
  loop. The VAE (for decoding) and the text encoder (for prompts) are loaded lazily, only when sampling or
  exporting.

Classifier-free guidance: with probability `text_drop_rate` a sample's text embedding is replaced by the encoding
of the empty prompt "" (the conditioner's dropout step), which is what `LatentPipeline.generate` and diffusers'
StableDiffusionPipeline use as the unconditional branch. Precached runs read the "" encoding from
`uncond.safetensors` next to the shards (written by `t2i precache`), or encode it once when the file is absent.
Cross-attention sees every token (no mask), as the SD pipelines do at inference.

The task's schedule (`DiscreteSchedule`, from the `model:` keys or from a base pipeline's scheduler) is built
once and shared by the loss, the denoiser and the sampling plan of its previews, which run through
`LatentPipeline` itself.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.config import LatentDiffusionConfig, RunConfig
from t2i.diffusion.denoisers import DiscreteDenoiser
from t2i.diffusion.losses import DiscreteDiffusionLoss
from t2i.diffusion.parameterization import normalize_prediction
from t2i.diffusion.schedules import DiscreteSchedule
from t2i.errors import ConfigError
from t2i.text.conditioner import SizeEmbedder
from t2i.train.task import register_task
from t2i.train.tasks.denoising import DenoisingTask, _uncompiled
from t2i.train.tasks.latent_text import (
    UNCOND_FILE,
    build_embedder_encoder,
    find_stored_uncond,
    task_conditioner,
    text_encoder_configs,
)

__all__ = ["UNCOND_FILE", "LatentDiffusionTask", "build_latent_task", "load_unet", "load_vae"]

DEFAULT_SAMPLER = "ddim"


def _check_keys(m: LatentDiffusionConfig) -> None:
    if (m.first_stage_key == "image_encoded") != (m.cond_stage_key == "captions_encoded"):
        raise ConfigError(
            f"model.first_stage_key / model.cond_stage_key: {m.first_stage_key!r} / {m.cond_stage_key!r}; "
            "expected images + captions (online) or image_encoded + captions_encoded (precached shards)"
        )


def load_unet(m: LatentDiffusionConfig) -> nn.Module:
    """The UNet of `unet_config`, initialised from `unet_config.from_pretrained` when set.

    `from_pretrained` may be a diffusers UNet / pipeline folder, or a safetensors file with CompVis keys
    (optionally prefixed `model.diffusion_model.`).
    """
    from t2i.models.unet import UNetModel

    unet = UNetModel(**m.unet_config.model_kwargs())
    source = m.unet_config.from_pretrained
    if source is None:
        return unet
    path = Path(source)
    if path.is_dir():
        from t2i.convert.unet_diffusers import load_unet_from_diffusers

        state = load_unet_from_diffusers(path).state_dict()
    elif path.suffix == ".safetensors" and path.is_file():
        from safetensors.torch import load_file

        prefix = "model.diffusion_model."
        state = {k.removeprefix(prefix): v for k, v in load_file(str(path)).items()
                 if k.startswith(prefix) or not k.startswith(("first_stage_model.", "cond_stage_model."))}
    else:
        raise ConfigError(f"model.unet_config.from_pretrained: {source!r} is not a folder or a .safetensors file")
    result = unet.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        from t2i.errors import WeightsMismatchError

        raise WeightsMismatchError(f"{source}: UNet weights do not fit unet_config; missing "
                                   f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    return unet


def load_vae(m: LatentDiffusionConfig) -> nn.Module:
    """The frozen AutoencoderKL: `first_stage_config.from_pretrained` if set, else random weights (tests)."""
    from t2i.convert.vae_diffusers import load_vae as load_vae_folder
    from t2i.models.autoencoder import AutoencoderKL

    first = m.first_stage_config
    if first.from_pretrained is not None:
        return load_vae_folder(first.from_pretrained)
    return AutoencoderKL(first.embed_dim, dataclasses.asdict(first.ddconfig))


def vae_factor(m: LatentDiffusionConfig) -> int:
    """Pixels per latent cell of the configured VAE (8 for SD's)."""
    return 2 ** (len(m.first_stage_config.ddconfig.ch_mult) - 1)


def unet_factor(unet: nn.Module) -> int:
    """Latent cells per cell of the UNet's lowest level (its input sides must be multiples of this)."""
    from t2i.models.layers import Downsample

    return 2 ** sum(isinstance(module, Downsample) for module in unet.modules())


class LatentDiffusionTask(DenoisingTask):
    """UNet + frozen first stage + frozen text encoder, trained with `DiscreteDiffusionLoss`.

    Built from the config (`LatentDiffusionTask(cfg)`), or around the components of a loaded base pipeline
    (`LatentDiffusionTask(cfg, pipe=...)`: its UNet, VAE, text encoder, schedule and prediction type; what LoRA
    fine-tuning of a diffusers folder or single file uses).

    Batches: `{"images" (B, 3, H, W), "captions": list[str]}` online, or `{"image_encoded": {"mean", "logvar"}
    (B, C, h, w), "captions_encoded": {"embeddings" (B, T, D), "mask"}}` precached. With `data.buckets` every
    batch is one bucket (H, W vary between batches) and carries `original_size_as_tuple` /
    `crop_coords_top_left` / `target_size_as_tuple` (B, 2).
    """

    supports_buckets = True

    def __init__(self, cfg: RunConfig, pipe: Any = None) -> None:
        super().__init__()
        m = cfg.model
        _check_keys(m)
        self.cfg = cfg
        self.precached = m.first_stage_key == "image_encoded"
        self._lazy: dict[str, nn.Module] = {}  # first stage / text encoder loaded for sampling only
        if pipe is not None:
            self._adopt(pipe)
        else:
            self.unet = load_unet(m)
            self.schedule = DiscreteSchedule.from_model_config(m)
            self.prediction = normalize_prediction(m.parameterization)
            self.scale_factor, self.shift_factor, self.sampler = m.scale_factor, m.shift_factor, DEFAULT_SAMPLER
            if not self.precached:
                from t2i.models.first_stage import LatentFirstStage

                self.first_stage = LatentFirstStage(load_vae(m), m.scale_factor, m.shift_factor)
                for name, emb in text_encoder_configs(m).items():
                    setattr(self, name, build_embedder_encoder(emb))
        self.loss = DiscreteDiffusionLoss(m.min_snr_gamma, m.offset_noise)
        if pipe is not None and m.conditioner_config is None and len(pipe.conditioner.embedders) > 1:
            self.conditioner = pipe.conditioner  # an SDXL base under a config without its own conditioner
        else:
            stored = find_stored_uncond(cfg.data.train) if self.precached else None
            self.conditioner = task_conditioner(m, self.frozen_text_encoder, self.unet, stored)
        self.text_names = self.conditioner.text_encoder_names()
        self.micro_conditioning = any(isinstance(e, SizeEmbedder) for e in self.conditioner.embedders)
        self.latent_factor = pipe.first_stage.downsample_factor if pipe is not None else vae_factor(m)
        factor = unet_factor(self.unet)
        self.check_sizes(factor, f"UNet x{factor}")

    def _adopt(self, pipe: Any) -> None:
        """Train on a loaded pipeline's own modules and schedule (its parts stay frozen until a wrapper says)."""
        self.unet, self.first_stage = pipe.unet, pipe.first_stage
        for name, encoder in pipe.text_encoders.items():
            setattr(self, name, encoder.requires_grad_(False))
        self.first_stage.requires_grad_(False)
        self.unet.requires_grad_(True)
        self.schedule, self.prediction = pipe.schedule, pipe.prediction
        self.scale_factor, self.sampler = pipe.scale_factor, pipe.default_sampler
        self.shift_factor = pipe.first_stage.shift_factor
        self._base_scheduler_config = dict(pipe.scheduler_config)

    # ------------------------------------------------------------------------------------ modules

    @property
    def backbone(self) -> nn.Module:
        return self.unet

    def frozen_first_stage(self) -> nn.Module:
        """The LatentFirstStage (built on first use in precached mode)."""
        if hasattr(self, "first_stage"):
            return self.first_stage
        if "first_stage" not in self._lazy:
            m = self.cfg.model
            if m.first_stage_config.from_pretrained is None:
                raise ConfigError("model.first_stage_config.from_pretrained: missing; precached training needs "
                                  "the VAE folder to decode samples and to export")
            from t2i.models.first_stage import LatentFirstStage

            self._lazy["first_stage"] = LatentFirstStage(load_vae(m), m.scale_factor, m.shift_factor).to(self.device)
        return self._lazy["first_stage"]

    def frozen_text_encoder(self, name: str = "text_encoder") -> nn.Module:
        """Text encoder `name` (`text_encoder`, SDXL's `text_encoder_2`), built on first use in precached mode."""
        if hasattr(self, name):
            return getattr(self, name)
        if name not in self._lazy:
            emb = text_encoder_configs(self.cfg.model)[name]
            self._lazy[name] = build_embedder_encoder(emb).to(self.device)
        return self._lazy[name]

    def text_encoders(self) -> dict[str, nn.Module]:
        """{diffusers name: frozen text encoder} of every text embedder, in order."""
        return {name: self.frozen_text_encoder(name) for name in self.text_names}

    def adapter_components(self) -> dict[str, nn.Module]:
        """The UNet and the first text encoder (LoRA's `train_text_encoder`)."""
        first = self.text_names[0]
        return {"unet": _uncompiled(self.unet), first: self.frozen_text_encoder(first)}

    def check_prior_preservation(self) -> None:
        if self.micro_conditioning:
            raise ConfigError("model.lora.prior: prior preservation does not pass SDXL's size conditioning to the "
                              "class samples yet; expected null for this model")

    def denoiser(self, net: nn.Module | None = None, **options: Any) -> DiscreteDenoiser:
        return DiscreteDenoiser(self.unet if net is None else net, self.schedule, self.prediction, **options)

    def train(self, mode: bool = True) -> LatentDiffusionTask:
        super().train(mode)
        if hasattr(self, "first_stage"):
            self.first_stage.eval()  # frozen parts never run dropout
        return self

    # ------------------------------------------------------------------------------------ data

    def encode_batch(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Scaled latents z (B, C, h, w) and the cond after text dropout; randomness: latent sample, text drop."""
        device = self.device
        if self.precached:
            from t2i.models.first_stage import latents_from_moments

            z = latents_from_moments(batch["image_encoded"], self.scale_factor, self.shift_factor, generator, device)
        else:
            z = self.first_stage.encode(batch["images"].to(device), generator)
        return z, self.conditioner(batch, generator, device)

    # ------------------------------------------------------------------------------------ sampling, export

    def scheduler_config(self) -> dict[str, Any]:
        """The diffusers scheduler config of the task's schedule for its default sampler."""
        if hasattr(self, "_base_scheduler_config"):
            return dict(self._base_scheduler_config)
        from t2i.pipelines.sd_folder import scheduler_config_from_model

        return scheduler_config_from_model(self.cfg.model, self.sampler)

    def pipeline(self, unet: nn.Module | None = None) -> Any:
        """A `LatentPipeline` over the task's own modules (the live UNet unless `unet` is given)."""
        from t2i.config import config_to_dict
        from t2i.pipelines.latent import LatentPipeline

        first_stage, encoders = self.frozen_first_stage(), self.text_encoders()
        return LatentPipeline(
            self.unet if unet is None else unet, first_stage.vae, encoders.get("text_encoder"),
            self.scheduler_config(), first_stage.scale_factor, self.sampler, config_to_dict(self.cfg.model),
            text_encoder_2=encoders.get("text_encoder_2"), conditioner=self.conditioner,
        )  # fmt: skip

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int, num_images: int = 1, **settings: Any) -> Any:
        """The pipeline's GenerationOutput for `prompts` at `trainer.sample.height` x `width` (null: the training
        resolution), with the `trainer.sample` defaults."""
        s, size = self.cfg.trainer.sample, self.cfg.data.resolution
        height, width = s.height or size, s.width or size
        options = {**self.sample_settings(), **{k: v for k, v in settings.items() if v is not None}}
        return self.pipeline().generate(
            list(prompts), num_images=num_images, seed=seed, height=height, width=width, progress=False, **options
        )

    def sample_images(self, prompts: list[str], seed: int, **settings: Any) -> list[Any]:
        """One PIL image per prompt (the loop calls this under EMA weights, in eval mode)."""
        return self.generate(prompts, seed, **settings).images

    def sample_model_space(
        self, prompts: list[str], seed: int, num_images: int, steps: int, guidance_scale: float
    ) -> torch.Tensor:
        out = self.generate(prompts, seed, num_images, steps=steps, guidance_scale=guidance_scale)
        return out.latents.to(self.device)

    def export(self, out_dir: str | Path, use_ema: bool = True) -> Path:
        """Write a t2i pipeline folder (diffusers layout + t2i.yaml) with the (EMA) UNet."""
        first_stage, encoders = self.frozen_first_stage(), self.text_encoders()
        with self.ema_weights(use_ema):
            unet = copy.deepcopy(_uncompiled(self.unet)).float().cpu()
        pipe = self.pipeline(unet)
        pipe.first_stage = copy.deepcopy(first_stage).cpu()
        for name, encoder in encoders.items():
            setattr(pipe, name, encoder.cpu())
        path = pipe.save_pretrained(out_dir)
        for encoder in encoders.values():
            encoder.to(self.device)
        return Path(path)


@register_task("latent_diffusion")
def build_latent_task(cfg: RunConfig) -> DenoisingTask:
    """Factory registered for `model.kind: latent_diffusion`; with `model.lora` the base is the pipeline named by
    `model.unet_config.from_pretrained`, wrapped in LoRA (and prior preservation when configured)."""
    if cfg.model.lora is None:
        return LatentDiffusionTask(cfg)
    from t2i.train.tasks.adapters import load_base_pipeline, wrap_with_adapters

    return wrap_with_adapters(LatentDiffusionTask(cfg, pipe=load_base_pipeline(cfg)), cfg)
