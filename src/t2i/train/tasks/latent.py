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
of the empty prompt "", and `sample_images` uses that same encoding as the unconditional branch, as
`LatentPipeline.generate` and diffusers' StableDiffusionPipeline do with an exported model, so training and every
sampler agree. Precached runs read the "" encoding from `uncond.safetensors` next to the shards (written by
`t2i precache`), or encode it once with the text encoder when the file is absent. Cross-attention sees every token
(no mask), as the SD pipelines do at inference.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.config import LatentDiffusionConfig, RunConfig
from t2i.diffusion.objectives import DiffusionObjective
from t2i.diffusion.schedules import make_alphas_cumprod
from t2i.errors import ConfigError
from t2i.train.task import DiffusionTask, register_task
from t2i.train.tasks import ObservedLoader

DEFAULT_SAMPLER = "ddim"
DEFAULT_SAMPLE_STEPS = 25
DEFAULT_GUIDANCE = 4.0


def _check_keys(m: LatentDiffusionConfig) -> None:
    if (m.first_stage_key == "image_encoded") != (m.cond_stage_key == "captions_encoded"):
        raise ConfigError(
            f"model.first_stage_key / model.cond_stage_key: {m.first_stage_key!r} / {m.cond_stage_key!r}; "
            "expected images + captions (online) or image_encoded + captions_encoded (precached shards)"
        )
    if m.lora is not None:
        raise ConfigError("model.lora: set; LatentDiffusionTask trains the full UNet, build the task with "
                          "build_task(cfg) to get the LoRA task")


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


class LatentDiffusionTask(DiffusionTask):
    """UNet + frozen first stage + frozen text encoder, trained with `DiffusionObjective`.

    Batches: `{"images" (B, 3, H, W), "captions": list[str]}` online, or `{"image_encoded": {"mean", "logvar"}
    (B, C, h, w), "captions_encoded": {"embeddings" (B, T, D), "mask"}}` precached.
    """

    def __init__(self, cfg: RunConfig, sampler: str = DEFAULT_SAMPLER, sample_steps: int = DEFAULT_SAMPLE_STEPS,
                 guidance_scale: float = DEFAULT_GUIDANCE) -> None:
        super().__init__()
        m = cfg.model
        _check_keys(m)
        self.cfg = cfg
        self.precached = m.first_stage_key == "image_encoded"
        self.unet = load_unet(m)
        self.alphas_cumprod = make_alphas_cumprod(m.beta_schedule, m.timesteps, m.linear_start, m.linear_end)
        self.objective = DiffusionObjective(self.alphas_cumprod, m.parameterization, m.min_snr_gamma, m.offset_noise)
        self.sampler, self.sample_steps, self.guidance_scale = sampler, sample_steps, guidance_scale
        self._lazy: dict[str, nn.Module] = {}  # first stage / text encoder loaded for sampling only
        if not self.precached:
            from t2i.models.first_stage import LatentFirstStage
            from t2i.pipelines.build import build_text_encoder

            self.first_stage = LatentFirstStage(load_vae(m), m.scale_factor)
            self.text_encoder = build_text_encoder(m)
        self._data: ObservedLoader | None = None
        self._uncond: torch.Tensor | None = None  # (1, T, D) encoding of "", cached on first use

    # ------------------------------------------------------------------------------------ frozen parts

    def frozen_first_stage(self) -> nn.Module:
        """The LatentFirstStage (built on first use in precached mode)."""
        if not self.precached:
            return self.first_stage
        if "first_stage" not in self._lazy:
            m = self.cfg.model
            if m.first_stage_config.from_pretrained is None:
                raise ConfigError("model.first_stage_config.from_pretrained: missing; precached training needs "
                                  "the VAE folder to decode samples and to export")
            from t2i.models.first_stage import LatentFirstStage

            self._lazy["first_stage"] = LatentFirstStage(load_vae(m), m.scale_factor).to(self.device)
        return self._lazy["first_stage"]

    def frozen_text_encoder(self) -> nn.Module:
        """The text encoder (built on first use in precached mode)."""
        if not self.precached:
            return self.text_encoder
        if "text_encoder" not in self._lazy:
            from t2i.pipelines.build import build_text_encoder

            self._lazy["text_encoder"] = build_text_encoder(self.cfg.model).to(self.device)
        return self._lazy["text_encoder"]

    def uncond_embedding(self) -> torch.Tensor:
        """The text encoding of "" (1, T, D), float32 on the UNet's device: the CFG unconditional input."""
        if self._uncond is None:
            stored = find_stored_uncond(self.cfg.data.train) if self.precached else None
            if stored is not None:
                from safetensors.torch import load_file

                self._uncond = load_file(str(stored))["embeddings"].float().unsqueeze(0)
            else:
                self._uncond = self.frozen_text_encoder().encode([""]).embeddings.detach().float().cpu()[:1]
        return self._uncond.to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ------------------------------------------------------------------------------------ the loop's API

    def build_dataloader(self, cfg: RunConfig, rank: int, world_size: int) -> ObservedLoader:
        """Endless batches of this rank's share of `data.train` (image shards or precached shards)."""
        d = cfg.data
        common = {"seed": cfg.seed, "rank": rank, "world_size": world_size, "shuffle_buffer": d.shuffle_buffer,
                  "repeat": True}
        if self.precached:
            from t2i.data.precached import build_precached_dataset

            dataset = build_precached_dataset(d.train, **common)
        else:
            from t2i.data.readers import build_dataset

            dataset = build_dataset(d.train, d.resolution, d.center_crop, d.random_flip, **common)
        self._data = ObservedLoader(dataset, d.batch_size, d.num_workers, cfg.seed)
        return self._data

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach() for name, t in self.unet.state_dict().items()}

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from t2i.models.autoencoder import load_state_dict_strict

        load_state_dict_strict(self.unet, dict(state), "UNet state")

    def compile_targets(self) -> list[nn.Module]:
        return [self.unet]

    def data_stats(self) -> dict[str, int | float]:
        return self._data.data_stats() if self._data is not None else {}

    def latents_and_context(self, batch: dict[str, Any], generator: torch.Generator
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latents z (B, C, h, w) and text embeddings (B, T, D) of a batch (either data path)."""
        device = self.device
        if self.precached:
            from t2i.models.autoencoder import DiagonalGaussian

            moments = batch["image_encoded"]
            mean, logvar = moments["mean"].to(device).float(), moments["logvar"].to(device).float()
            # what LatentFirstStage.z_from_moments does, without loading the VAE
            z = DiagonalGaussian(mean, logvar).sample(generator) * self.cfg.model.scale_factor
            context = batch["captions_encoded"]["embeddings"].to(device).float()
            return z, context
        images = batch["images"].to(device)
        z = self.first_stage.encode(images, generator)
        context = self.text_encoder.encode(list(batch["captions"])).embeddings.to(device).float()
        return z, context

    def drop_text(self, context: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Replace each sample's text embedding (B, T, D) by the encoding of "" with probability `text_drop_rate`."""
        rate = self.cfg.model.text_drop_rate
        if rate <= 0:
            return context
        keep = torch.rand(context.shape[0], generator=generator, device=context.device) >= rate
        uncond = self.uncond_embedding().to(context.device, context.dtype)
        if uncond.shape[1:] != context.shape[1:]:
            raise ConfigError(f"uncond.safetensors: \"\" encoding has shape {tuple(uncond.shape[1:])}, captions "
                              f"{tuple(context.shape[1:])}; re-run t2i precache with this config's text encoder")
        return torch.where(keep.view(-1, 1, 1), context, uncond)

    def training_loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """Scalar diffusion loss of one batch; randomness order: latent sample, text drop, t, noise."""
        z, context = self.latents_and_context(batch, generator)
        context = self.drop_text(context, generator)
        if self.cfg.model.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        return self.objective.loss(self.unet, z, {"context": context}, generator)

    # ------------------------------------------------------------------------------------ sampling, export

    def scheduler_config(self) -> dict[str, Any]:
        from t2i.pipelines.loading import scheduler_config_from_model

        return scheduler_config_from_model(self.cfg.model, self.sampler)

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], seed: int, guidance_scale: float | None = None,
                       steps: int | None = None, batch_size: int = 64) -> torch.Tensor:
        """Scaled latents (B, C, h, w) for `prompts`; CFG against the encoding of "". Seeded, batched."""
        from t2i.diffusion.denoisers import DiscreteDenoiser
        from t2i.diffusion.guidance import CFGDenoiser
        from t2i.diffusion.plans import make_plan

        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        plan = make_plan(self.sampler, self.scheduler_config(), steps or self.sample_steps)
        inner = DiscreteDenoiser(self.unet, self.alphas_cumprod, self.cfg.model.parameterization).to(self.device)
        denoiser = CFGDenoiser(inner, scale) if scale > 1 else inner
        generator = torch.Generator("cpu").manual_seed(seed)
        first_stage = self.frozen_first_stage()
        side = self.cfg.data.resolution // first_stage.downsample_factor
        noise = torch.randn(len(prompts), first_stage.latent_channels, side, side, generator=generator)
        outputs = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            context = self.frozen_text_encoder().encode(chunk).embeddings.to(self.device).float()
            x = noise[start:start + batch_size].to(self.device)
            cond = {"context": context, "uncond_context": self.uncond_embedding().expand_as(context)}
            outputs.append(plan.sample(denoiser, x, cond, generator=generator))
        return torch.cat(outputs)

    @torch.no_grad()
    def sample_images(self, prompts: list[str], seed: int, guidance_scale: float | None = None,
                      steps: int | None = None) -> list[Any]:
        """One PIL image per prompt (the loop calls this under EMA weights, in eval mode)."""
        from t2i.data.transforms import to_pil

        latents = self.sample_latents(list(prompts), seed, guidance_scale, steps)
        return to_pil(self.frozen_first_stage().decode(latents).float())

    def export(self, out_dir: str | Path, use_ema: bool = True) -> Path:
        """Write a t2i pipeline folder (diffusers layout + t2i.yaml) with the (EMA) UNet."""
        from t2i.config import config_to_dict
        from t2i.pipelines.latent import LatentPipeline

        first_stage, text_encoder = self.frozen_first_stage(), self.frozen_text_encoder()
        with self.ema_weights(use_ema):
            unet = copy.deepcopy(_uncompiled(self.unet)).float().cpu()
        pipe = LatentPipeline(unet, copy.deepcopy(first_stage.vae).cpu(), text_encoder.cpu(), self.scheduler_config(),
                              first_stage.scale_factor, self.sampler, model_config=config_to_dict(self.cfg.model))
        path = pipe.save_pretrained(out_dir)
        text_encoder.to(self.device)
        return Path(path)


UNCOND_FILE = "uncond.safetensors"


def find_stored_uncond(train: list[str]) -> Path | None:
    """`uncond.safetensors` in the folder of the first precached source (a folder or a shard pattern), if any."""
    if not train:
        return None
    source = Path(str(train[0]))
    folder = source if source.is_dir() else source.parent
    path = folder / UNCOND_FILE
    return path if path.is_file() else None


def _uncompiled(module: nn.Module) -> nn.Module:
    return getattr(module, "_orig_mod", module)


@register_task("latent_diffusion")
def build_latent_task(cfg: RunConfig) -> DiffusionTask:
    """Factory registered for `model.kind: latent_diffusion`: the LoRA task when `model.lora` is set."""
    if cfg.model.lora is not None:
        from t2i.train.tasks.lora import build_lora_task

        return build_lora_task(cfg)
    return LatentDiffusionTask(cfg)
