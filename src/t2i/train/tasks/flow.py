"""Rectified-flow training task (`model.kind: flow`, the Flux family): a transformer trained to predict the flow
velocity in the latent space of a frozen VAE, conditioned on frozen text encoders.

Batches are `{"images" (B, 3, H, W) in [-1, 1], "captions": list[str]}` (online: the VAE and the text encoders run
every step), or with `first_stage_key: image_encoded` and `cond_stage_key: captions_encoded` the shards `t2i
precache` writes for this config (VAE moments; context tokens, mask and pooled vector), with the encodings of ""
read from the shards' `uncond.safetensors`. The loss is `FlowMatchingLoss` on the model's
`FlowSchedule` (shared with the previews' sampling plan); text dropout at `text_drop_rate` replaces both the
tokens and the pooled vector by the encodings of "" (the branch classifier-free guidance subtracts). A
guidance-distilled transformer (`guidance_embed`) is fed `model.guidance_scale` as its embedded guidance.
Previews and exports go through `FluxPipeline`; an export is a FluxPipeline folder (+ t2i.yaml).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.config import RunConfig
from t2i.diffusion.denoisers import FlowDenoiser
from t2i.diffusion.losses import FlowMatchingLoss
from t2i.diffusion.schedules import FlowSchedule
from t2i.errors import ConfigError
from t2i.text.conditioner import Conditioner, ContextPooledEmbedder
from t2i.train.task import register_task
from t2i.train.tasks.denoising import DenoisingTask, _uncompiled
from t2i.train.tasks.latent import LatentDiffusionTask
from t2i.train.tasks.latent_text import find_stored_uncond, read_stored_uncond


def load_transformer(m: Any) -> nn.Module:
    """The backbone of `transformer_config`, initialised from its `from_pretrained` (a diffusers transformer or
    pipeline folder, or a BFL single file) when set."""
    from t2i.pipelines.flux_folder import build_transformer

    source = m.transformer_config.from_pretrained
    if source is None:
        return build_transformer(m)
    from t2i.convert.flux_diffusers import load_flux_transformer

    kwargs = m.transformer_config.model_kwargs()
    use_checkpoint = kwargs.pop("use_checkpoint")
    single_file = Path(source).suffix == ".safetensors"
    model = load_flux_transformer(source, config=kwargs if single_file else None, use_checkpoint=use_checkpoint)
    loaded = {k: v for k, v in model.flux_config.items() if k in kwargs}
    if loaded != {k: kwargs[k] for k in loaded}:
        raise ConfigError(f"model.transformer_config.from_pretrained: {source} holds a transformer of another shape "
                          f"than transformer_config ({loaded})")  # fmt: skip
    return model.train()


def load_flow_vae(m: Any) -> nn.Module:
    """The frozen VAE: `first_stage_config.from_pretrained` if set, else random weights (tests)."""
    from t2i.pipelines.flux_folder import build_flow_vae

    if m.first_stage_config.from_pretrained is None:
        return build_flow_vae(m)
    from t2i.convert.vae_diffusers import load_vae

    return load_vae(m.first_stage_config.from_pretrained)


class FlowTask(DenoisingTask):
    """Transformer + frozen first stage + frozen text encoders, trained with `FlowMatchingLoss`. With
    `data.buckets` every batch is one aspect-ratio bucket (the transformer's RoPE takes any latent grid)."""

    default_sample_steps = 20
    supports_buckets = True

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        m = cfg.model
        keys = (m.first_stage_key, m.cond_stage_key)
        if keys not in (("images", "captions"), ("image_encoded", "captions_encoded")):
            raise ConfigError(f"model.first_stage_key / model.cond_stage_key: {keys}; expected images + captions "
                              "(online) or image_encoded + captions_encoded (shards from t2i precache)")  # fmt: skip
        self.precached = keys[0] == "image_encoded"
        from t2i.models.first_stage import LatentFirstStage
        from t2i.pipelines.flux_folder import build_text

        self.cfg = cfg
        self.transformer = load_transformer(m)
        self.first_stage = LatentFirstStage(load_flow_vae(m), m.scale_factor, m.shift_factor)
        self.context_encoder = build_text(m.context_encoder)
        self.pooled_encoder = build_text(m.pooled_encoder) if m.pooled_encoder is not None else None
        self.schedule = FlowSchedule(**dataclasses.asdict(m.schedule))
        self.loss = FlowMatchingLoss(self.schedule, patch_size=self.transformer.patch_size,
                                     **dataclasses.asdict(m.loss))  # fmt: skip
        pooled = (lambda: self.pooled_encoder) if self.pooled_encoder is not None else None
        stored = find_stored_uncond(cfg.data.train) if self.precached else None
        self.conditioner = Conditioner([
            ContextPooledEmbedder(lambda: self.context_encoder, m.text_drop_rate, masked=m.mask_text_tokens,
                                  pooled_encoder=pooled,
                                  empty=None if stored is None else (lambda: read_stored_uncond(stored)))
        ])  # fmt: skip
        if self.transformer.guidance_embed:
            self.default_guidance_scale = m.guidance_scale
        self.latent_factor = self.first_stage.downsample_factor
        self.check_sizes(self.transformer.patch_size, f"patch {self.transformer.patch_size}")

    # ------------------------------------------------------------------------------------ modules

    @property
    def backbone(self) -> nn.Module:
        return self.transformer

    def denoiser(self, net: nn.Module | None = None) -> FlowDenoiser:
        return FlowDenoiser(self.transformer if net is None else net, t_min=1 / self.schedule.num_train_timesteps)

    def adapter_components(self) -> dict[str, nn.Module]:
        """The transformer (LoRA files name it `transformer`, in diffusers' Flux naming) and the pooled CLIP."""
        components = {"transformer": _uncompiled(self.transformer)}
        if self.pooled_encoder is not None:
            components["text_encoder"] = self.pooled_encoder
        return components

    def train(self, mode: bool = True) -> FlowTask:
        super().train(mode)
        self.first_stage.eval()  # frozen parts never run dropout
        return self

    # ------------------------------------------------------------------------------------ data

    def encode_batch(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Scaled latents z (B, 16, h, w) and the cond after text dropout (+ the embedded guidance)."""
        device = self.device
        if self.precached:
            from t2i.models.first_stage import latents_from_moments

            fs = self.first_stage
            z = latents_from_moments(batch["image_encoded"], fs.scale_factor, fs.shift_factor, generator, device)
        else:
            z = self.first_stage.encode(batch["images"].to(device), generator)
        cond = self.conditioner(batch, generator, device)
        if self.transformer.guidance_embed:
            cond["guidance"] = torch.full((z.shape[0],), self.cfg.model.guidance_scale, device=device)
        return z, cond

    # ------------------------------------------------------------------------------------ sampling, export

    def pipeline(self, transformer: nn.Module | None = None) -> Any:
        """A `FluxPipeline` over the task's own modules (the live transformer unless `transformer` is given)."""
        from t2i.pipelines.flux_folder import assemble_flux_pipeline

        pipe = assemble_flux_pipeline(
            self.cfg.model, self.transformer if transformer is None else transformer, self.first_stage.vae,
            self.context_encoder, self.pooled_encoder, freeze=False,
        )  # fmt: skip
        pipe.first_stage = self.first_stage
        return pipe

    # previews, class samples: the latent family's, through this task's `pipeline()`
    generate = LatentDiffusionTask.generate
    sample_images = LatentDiffusionTask.sample_images
    sample_model_space = LatentDiffusionTask.sample_model_space

    def export(self, out_dir: str | Path, use_ema: bool = True) -> Path:
        """Write a FluxPipeline folder (diffusers layout + t2i.yaml) with the (EMA) transformer."""
        with self.ema_weights(use_ema):
            transformer = copy.deepcopy(_uncompiled(self.transformer)).float().cpu()
        pipe = self.pipeline(transformer)
        pipe.first_stage = copy.deepcopy(self.first_stage).cpu()
        pipe.context_encoder = copy.deepcopy(self.context_encoder).cpu()
        if self.pooled_encoder is not None:
            pipe.pooled_encoder = copy.deepcopy(self.pooled_encoder).cpu()
        return Path(pipe.save_pretrained(out_dir))


@register_task("flow")
def build_flow_task(cfg: RunConfig) -> DenoisingTask:
    """Factory registered for `model.kind: flow`; with `model.lora` the transformer of
    `transformer_config.from_pretrained` is the frozen base and only the adapters train (`LoraTask`)."""
    if cfg.model.lora is None:
        return FlowTask(cfg)
    if cfg.model.transformer_config.from_pretrained is None:
        raise ConfigError("model.transformer_config.from_pretrained: missing; LoRA training needs the base "
                          "transformer (a Flux pipeline or transformer folder, or a BFL single file)")
    from t2i.train.tasks.adapters import wrap_with_adapters

    return wrap_with_adapters(FlowTask(cfg), cfg)
