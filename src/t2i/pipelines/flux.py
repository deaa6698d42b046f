"""The rectified-flow text-to-image pipeline (FLUX.1 and Flux-shaped models): prompt -> context tokens (T5) and
pooled vector (CLIP) -> sampler over the flow denoiser (embedded guidance, optional classifier-free guidance) ->
VAE decode -> PIL images.

It is the latent pipeline's recipe with a flow model in it: the first stage (`LatentFirstStage` with FLUX.1's
shift), the text encoders (`t2i.text`), the sampling plan (`make_plan` on the flow-matching scheduler config, with
Flux's resolution-dependent shift mu for the image's token count and FluxPipeline's times), `FlowDenoiser` and
`CFGDenoiser` are the shared pieces; packing latents into 2x2 tokens happens inside the transformer.

Guidance. `guidance_scale` is the model's guidance: for a guidance-distilled transformer (FLUX.1-dev,
`guidance_embed`) the scale embedded into the transformer (diffusers' `guidance_scale`), otherwise classifier-free
guidance against `negative_prompt` ("" by default). `true_cfg_scale` adds classifier-free guidance on top of the
embedded guidance (diffusers' `true_cfg_scale`); both branches see the same embedded scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.diffusion.denoisers import FlowDenoiser
from t2i.diffusion.guidance import CFGDenoiser
from t2i.diffusion.plans import SamplingPlan, make_plan
from t2i.diffusion.samplers import Callback
from t2i.diffusion.schedules import FlowSchedule, flux_sampling_times, image_seq_len
from t2i.diffusion.tensors import Generators
from t2i.errors import InvalidInputError, checked_arguments
from t2i.models.first_stage import LatentFirstStage
from t2i.pipelines.components import BackboneAndFirstStage
from t2i.pipelines.inputs import (
    check_guidance_scale,
    check_num_images,
    negative_prompts,
    normalize_prompts,
    to_pil,
)
from t2i.pipelines.latent import GenerationOutput, LatentPipeline
from t2i.pipelines.lora_methods import LoraMethods

DEFAULT_STEPS = 28
DEFAULT_SAMPLER = "euler"


class FluxPipeline(BackboneAndFirstStage, LoraMethods):
    """Flux inference: `generate` (text-to-image).

    Args:
        transformer: t2i `FluxTransformer` (velocity prediction).
        vae: t2i `AutoencoderKL`; latents are (z - shift_factor) * scale_factor.
        context_encoder: frozen `TextEncoder` whose token embeddings are the transformer's context (T5).
        pooled_encoder: frozen `TextEncoder` whose pooled output is the transformer's vector input (CLIP); None =
            the context encoder's pooled output.
        scheduler_config: diffusers FlowMatch* scheduler config (shift, dynamic shifting); `_class_name` picks the
            default sampler (Euler; Heun for FlowMatchHeunDiscreteScheduler).
        scale_factor, shift_factor: the latent normalisation (FLUX.1: 0.3611, 0.1159).
        model_config: the `model:` section (dict) this pipeline was built from, if any.
        mask_text_tokens: pass the text padding mask to the transformer (FLUX.1: no).
        guidance_scale: the default `guidance_scale` of `generate`.
    """

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        context_encoder: nn.Module,
        pooled_encoder: nn.Module | None,
        scheduler_config: dict[str, Any],
        scale_factor: float,
        shift_factor: float = 0.0,
        model_config: dict[str, Any] | None = None,
        mask_text_tokens: bool = False,
        guidance_scale: float = 3.5,
    ):
        self.transformer = transformer
        self.first_stage = LatentFirstStage(vae, scale_factor, shift_factor)
        self.context_encoder = context_encoder
        self.pooled_encoder = pooled_encoder
        self.scheduler_config = dict(scheduler_config)
        self.schedule = FlowSchedule.from_scheduler_config(self.scheduler_config)
        self.default_sampler = "heun" if "Heun" in str(scheduler_config.get("_class_name")) else DEFAULT_SAMPLER
        self.model_config = model_config
        self.mask_text_tokens = bool(mask_text_tokens)
        self.default_guidance = float(guidance_scale)

    # ------------------------------------------------------------------------------------ components

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self.context_encoder] + ([self.pooled_encoder] if self.pooled_encoder is not None else [])

    def adapter_slots(self) -> list[dict[str, nn.Module]]:
        """Where LoRA files land (`t2i.lora`): the transformer, and the CLIP encoder when there is one (diffusers'
        `text_encoder`)."""
        slot: dict[str, nn.Module] = {"transformer": self.transformer}
        if self.pooled_encoder is not None:
            slot["text_encoder"] = getattr(self.pooled_encoder, "model", self.pooled_encoder)
        return [slot]

    def text_modules(self) -> list[nn.Module]:
        return list(self.text_encoders)

    @property
    def backbone(self) -> nn.Module:
        return self.transformer

    @property
    def shift_factor(self) -> float:
        return self.first_stage.shift_factor

    @property
    def guidance_distilled(self) -> bool:
        """Whether the transformer takes an embedded guidance scale (FLUX.1-dev) rather than CFG alone."""
        return bool(getattr(self.transformer, "guidance_embed", False))

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: VAE factor x the transformer's patch size."""
        return self.first_stage.downsample_factor * self.transformer.patch_size

    @property
    def default_size(self) -> int:
        return int(self.vae.ddconfig.get("resolution") or 1024)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> FluxPipeline:
        """Move every component to `device`; cast transformer and VAE weights to `dtype` (the text encoders too,
        off the CPU)."""
        for module in (self.transformer, self.first_stage):
            module.to(device=device, dtype=dtype)
        on_accelerator = device is not None and torch.device(device).type != "cpu"
        for encoder in self.text_encoders:
            encoder.to(device=device, dtype=dtype if dtype is not None and on_accelerator else None)
        return self

    # ------------------------------------------------------------------------------------ building blocks

    def denoiser(self, cfg_scale: float = 1.0) -> nn.Module:
        """The transformer as `D(x, sigma, cond) -> x0`, in classifier-free guidance when cfg_scale > 1."""
        inner = FlowDenoiser(self.transformer, t_min=1 / self.schedule.num_train_timesteps)
        return CFGDenoiser(inner, cfg_scale) if cfg_scale > 1 else inner

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompts (B) -> {context (B, T, D), pooled (B, D_pooled)[, context_mask (B, T)]} float32 on the
        transformer's device."""
        encoding = self.context_encoder.encode(prompts)
        pooled = encoding.pooled if self.pooled_encoder is None else self.pooled_encoder.encode(prompts).pooled
        cond = {
            "context": encoding.embeddings.to(self.device, torch.float32),
            "pooled": pooled.to(self.device, torch.float32),
        }
        if self.mask_text_tokens:
            cond["context_mask"] = encoding.mask.to(self.device)
        return cond

    def conditioning(
        self,
        prompts: list[str],
        negative_prompt: str | list[str] | None,
        num_images: int,
        cfg_scale: float,
        embedded_guidance: float | None,
    ) -> dict[str, torch.Tensor]:
        """cond for the (CFG) denoiser: each prompt repeated `num_images` times in a row, as diffusers does; the
        negative prompts as `uncond_` twins when cfg_scale > 1; `guidance` (B,) for a guidance-distilled model."""
        cond = {k: v.repeat_interleave(num_images, dim=0) for k, v in self.encode_prompts(prompts).items()}
        if cfg_scale > 1:
            negatives = self.encode_prompts(negative_prompts(negative_prompt, len(prompts)))
            cond |= {f"uncond_{k}": v.repeat_interleave(num_images, dim=0) for k, v in negatives.items()}
        if embedded_guidance is not None:
            cond["guidance"] = torch.full((len(prompts) * num_images,), embedded_guidance, device=self.device)
        return cond

    def plan(
        self, sampler: str | None, steps: int, height: int, width: int, use_karras_sigmas: bool = False
    ) -> SamplingPlan:
        """The sampling plan of `sampler` (default: the scheduler config's) for `steps` steps at an image size:
        FluxPipeline's times, shifted by mu of the image's token count when the schedule shifts dynamically."""
        if not isinstance(steps, int) or steps < 1:
            raise InvalidInputError(f"steps: expected an integer >= 1, got {steps!r}")
        f = self.first_stage.downsample_factor
        tokens = image_seq_len(height // f, width // f, self.transformer.patch_size)
        return make_plan(
            sampler or self.default_sampler, self.scheduler_config, steps, use_karras_sigmas, self.schedule,
            mu=self.schedule.mu(tokens), times=flux_sampling_times(steps),
        )  # fmt: skip

    def guidance(self, guidance_scale: float | None, true_cfg_scale: float | None) -> tuple[float, float | None]:
        """(classifier-free scale, embedded guidance or None) from generate's two knobs."""
        scale = self.default_guidance if guidance_scale is None else check_guidance_scale(guidance_scale)
        true_cfg = 1.0 if true_cfg_scale is None else check_guidance_scale(true_cfg_scale)
        if self.guidance_distilled:
            return true_cfg, scale
        if true_cfg_scale is not None and guidance_scale is not None and true_cfg != scale:
            raise InvalidInputError(
                f"true_cfg_scale: {true_cfg} and guidance_scale: {scale} disagree; this model has no guidance "
                "embedding, so both mean classifier-free guidance (give one)"
            )
        return (scale if guidance_scale is not None else true_cfg), None

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) with defaults filled; InvalidInputError unless both are multiples of `size_multiple`."""
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        m = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % m:
                raise InvalidInputError(
                    f"{name}: {value!r} is not a positive multiple of {m} (VAE factor "
                    f"{self.first_stage.downsample_factor} x patch size {self.transformer.patch_size})"
                )
        return height, width

    make_generator = staticmethod(LatentPipeline.make_generator)
    sampler_options = staticmethod(LatentPipeline.sampler_options)
    decode = LatentPipeline.decode

    # ------------------------------------------------------------------------------------ public API

    @checked_arguments
    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int = DEFAULT_STEPS,
        guidance_scale: float | None = None,
        true_cfg_scale: float | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        num_images: int = 1,
        latents: torch.Tensor | None = None,
        use_karras_sigmas: bool = False,
        eta: float | None = None,
        progress: bool = True,
        generator: Generators = None,
        callback: Callback | None = None,
    ) -> GenerationOutput:
        """Text-to-image. `latents` (B, C, h, w) are unit-variance initial noise at latent size (unpacked, as for
        every t2i family; diffusers' FluxPipeline takes them packed), B = len(prompts) * num_images; when None they
        are drawn from `generator` (or `seed`) exactly as diffusers draws them. `guidance_scale` (None: the model's
        default) and `true_cfg_scale`: see the module docstring. `callback(i, sigma, x, x0)` runs after each
        step's model evaluation (the samplers' callback)."""
        prompts = normalize_prompts(prompt)
        cfg_scale, embedded = self.guidance(guidance_scale, true_cfg_scale)
        check_num_images(num_images)
        height, width = self.check_size(height, width)
        plan = self.plan(sampler, steps, height, width, use_karras_sigmas)
        options = self.sampler_options(plan.sampler, eta)
        generator = self.make_generator(seed, generator)
        shape = self.latent_shape(len(prompts) * num_images, height, width)
        latents = self.initial_noise(latents, shape, generator, " (unpacked noise at latent size)")
        cond = self.conditioning(prompts, negative_prompt, num_images, cfg_scale, embedded)
        x = plan.sample(
            self.denoiser(cfg_scale),
            latents.to(self.device, torch.float32),
            cond,
            generator=generator,
            callback=callback,
            progress=progress,
            **options,
        )
        pixels = self.decode(x)
        return GenerationOutput(to_pil(pixels), x, pixels)

    def reconstruct(self, *args: Any, **kwargs: Any) -> GenerationOutput:
        """Image-to-image is not implemented for Flux pipelines yet (a clear error, not an AttributeError)."""
        raise InvalidInputError(
            "image-to-image (reconstruct, --init-image): not available for Flux pipelines yet; use generate"
        )

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a diffusers FluxPipeline folder (+ t2i.yaml) that diffusers and `t2i.load_pipeline` load."""
        from t2i.pipelines.flux_save import save_flux_pipeline

        return save_flux_pipeline(self, path)
