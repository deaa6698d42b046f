"""The Stable Diffusion (latent diffusion) text-to-image pipeline: prompt -> text encoder -> sampler over the
UNet denoiser with classifier-free guidance -> VAE decode -> PIL images.

The sampling schedule is a diffusers scheduler config (dict) kept on the pipeline: it fixes the training betas
(built once into `pipe.schedule`, a `DiscreteSchedule`), the prediction type, the timestep spacing and
`steps_offset`. Every sampler honours it through `t2i.diffusion.plans.make_plan(sampler, scheduler_config, steps,
schedule=pipe.schedule)`, and the plan configures the denoiser it samples, so `sampler="ddim"` on a diffusers
folder reproduces diffusers' `DDIMScheduler.from_config(pipe.scheduler.config)`.

Classifier-free guidance (SD family, as diffusers): the unconditional branch is the encoding of
`negative_prompt`, or of the empty string "" when none is given; guidance is off for `guidance_scale <= 1`.
Cross-attention is not masked (the text mask is only used inside BERT/T5 encoders).

Conditioning goes through a `t2i.text.conditioner.Conditioner`: SD 1/2 have one text embedder (the `context`
above); SDXL has two text encoders (`text_encoder`, `text_encoder_2`; the refiner only the second), whose token
embeddings concatenate into `context` and whose pooled output starts the ADM vector `y`, followed by the
micro-conditioning (`t2i.pipelines.conditioning`). With no negative prompt and a conditioner whose text drops to
zeros (diffusers' `force_zeros_for_empty_prompt`), the unconditional text is zeros. Base and refiner form an
ensemble of experts through `generate(denoising_end=, output_type="latent")` and `reconstruct(image=latents,
denoising_start=)`.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from t2i.diffusion.denoisers import DiscreteDenoiser
from t2i.diffusion.guidance import CFGDenoiser
from t2i.diffusion.parameterization import normalize_prediction
from t2i.diffusion.plans import SamplingPlan, make_plan
from t2i.diffusion.samplers import Callback, get_sampler
from t2i.diffusion.schedules import DiscreteSchedule
from t2i.diffusion.tensors import Generators, randn
from t2i.errors import InvalidInputError, PipelineLoadError
from t2i.models.first_stage import LatentFirstStage
from t2i.pipelines.components import BackboneAndFirstStage
from t2i.pipelines.conditioning import (
    MicroConditioning,
    head_plan,
    latents_to_sampler_scale,
    refiner_start,
    size_inputs,
    strength_tail,
    tail_plan,
)
from t2i.pipelines.inputs import (
    check_guidance_scale,
    check_num_images,
    check_rescale,
    check_strength,
    negative_prompts,
    normalize_prompts,
    to_pil,
)
from t2i.pipelines.latent_editing import UNET_TASKS, EditingMethods
from t2i.pipelines.lora_methods import LoraMethods
from t2i.text.conditioner import Conditioner, TextEmbedder

DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 7.5
SDXL_DEFAULT_GUIDANCE = 5.0  # diffusers' StableDiffusionXL*Pipeline default


@dataclass
class GenerationOutput:
    """images: PIL images; latents (B, C, h, w): final scaled latents; pixels (B, 3, H, W) float in [0, 1] (CPU).

    With `output_type="latent"` nothing is decoded: images is [] and pixels None (a base stopped at
    `denoising_end` hands its noisy latents to a refiner)."""

    images: list[Any]
    latents: torch.Tensor
    pixels: torch.Tensor | None


def micro_conditioning_of(options: dict[str, Any]) -> MicroConditioning:
    """generate()/reconstruct()'s extra keywords as MicroConditioning; InvalidInputError for unknown ones."""
    try:
        return MicroConditioning(**options)
    except TypeError:
        from dataclasses import fields

        valid = [f.name for f in fields(MicroConditioning)]
        unknown = sorted(set(options) - set(valid))
        raise InvalidInputError(
            f"{unknown[0]}: unknown argument; expected the usual ones or micro-conditioning ({', '.join(valid)})"
        ) from None


# UNets that take extra channels concatenated to the latents, by how many they take in all (diffusers' names).
CONCAT_CONDITIONED_UNETS = {9: "an inpainting UNet (latents + mask + masked-image latents)",
                            8: "an InstructPix2Pix UNet (latents + source-image latents)",
                            5: "a depth-to-image UNet (latents + depth map)"}  # fmt: skip


def check_unet_takes_latents(unet: nn.Module, latent_channels: int) -> None:
    """PipelineLoadError at load for a UNet whose input t2i cannot feed (it would crash at the first step
    otherwise): the VAE's latents alone, or with inpainting's or InstructPix2Pix's extra channels."""
    in_channels = getattr(unet, "in_channels", latent_channels)
    if in_channels - latent_channels in UNET_TASKS:  # depth maps (5 channels in all) are not estimated here
        return
    kind = CONCAT_CONDITIONED_UNETS.get(in_channels, "a UNet with extra input channels")
    raise PipelineLoadError(
        f"unet.in_channels: {in_channels} is {kind}, which t2i does not sample yet; expected {latent_channels} "
        f"(text-to-image), {latent_channels + 5} (inpainting) or {latent_channels + 4} (InstructPix2Pix)"
    )


class LatentPipeline(BackboneAndFirstStage, LoraMethods, EditingMethods):
    """Stable Diffusion inference: `generate` (text-to-image), `reconstruct` (image-to-image), and on UNets with
    extra input channels `inpaint` and `edit` (`t2i.pipelines.latent_editing`).

    Args:
        unet: t2i `UNetModel` (eps / v / x0 prediction per the scheduler config).
        vae: t2i `AutoencoderKL`; latents are scaled by `scale_factor`.
        text_encoder: a frozen `t2i.text.encoders.TextEncoder` (None for the SDXL refiner).
        scheduler_config: diffusers scheduler config dict; `_class_name` picks the default sampler.
        model_config: the `model:` config section (dict) this pipeline was built from, if any; its
            `conditioner_config` (SDXL) defines the conditioner when `conditioner` is None.
        default_sampler: sampler used when `generate(sampler=None)`.
        text_encoder_2: SDXL's second text encoder (bigG, pooled).
        conditioner: the conditioning; None: built from `model_config` (SDXL) or SD's single text embedder. Its
            text embedders read `self.<name>` for the names of `conditioner.text_encoder_names()`.
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        scheduler_config: dict[str, Any],
        scale_factor: float,
        default_sampler: str,
        model_config: dict[str, Any] | None = None,
        text_encoder_2: nn.Module | None = None,
        conditioner: Conditioner | None = None,
    ):
        self.unet = unet
        self.first_stage = LatentFirstStage(vae, scale_factor, getattr(vae, "shift_factor", None) or 0.0)
        check_unet_takes_latents(unet, self.first_stage.latent_channels)
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.scheduler_config = dict(scheduler_config)
        self.schedule = DiscreteSchedule.from_scheduler_config(self.scheduler_config)
        self.prediction = normalize_prediction(
            self.scheduler_config.get("prediction_type") or "epsilon", "scheduler.prediction_type"
        )
        self.default_sampler = default_sampler
        self.model_config = model_config
        self.conditioner = conditioner if conditioner is not None else self.default_conditioner()

    def default_conditioner(self) -> Conditioner:
        """The model config's conditioner (SDXL), else SD's one text embedder (dropped to "")."""
        if (self.model_config or {}).get("conditioner_config") is None:
            return Conditioner([TextEmbedder(lambda: self.text_encoder)])
        from t2i.pipelines.build import as_model_config
        from t2i.text.conditioner import build_conditioner, text_encoder_names

        cfg = as_model_config(self.model_config)
        names = text_encoder_names([e.emb_model.always_return_pooled for e in cfg.embedders() if e.is_text])
        return build_conditioner(cfg, [lambda name=name: getattr(self, name) for name in names])

    @property
    def default_guidance(self) -> float:
        """The guidance scale `generate` / `reconstruct` use when given None: diffusers' (SDXL 5.0, SD 7.5)."""
        return SDXL_DEFAULT_GUIDANCE if "text_encoder_2" in self.text_encoders else DEFAULT_GUIDANCE

    @property
    def text_encoders(self) -> dict[str, nn.Module]:
        """{diffusers component name: TextEncoder} of the conditioner's text embedders, in order."""
        return {name: getattr(self, name) for name in self.conditioner.text_encoder_names()}

    def adapter_slots(self) -> list[dict[str, nn.Module]]:
        """Where LoRA files land (`t2i.lora`): one slot, the UNet and each text encoder's transformer."""
        texts = {name: getattr(e, "model", e) for name, e in self.text_encoders.items()}
        return [{"unet": self.unet, **texts}]

    def text_modules(self) -> list[nn.Module]:
        return list(self.text_encoders.values())

    # ------------------------------------------------------------------------------------ properties

    @property
    def backbone(self) -> nn.Module:
        return self.unet

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: VAE factor x the UNet's total downsampling."""
        levels = len(getattr(self.unet, "channel_mult", [1]))
        return self.first_stage.downsample_factor * 2 ** (levels - 1)

    @property
    def default_size(self) -> int:
        image_size = getattr(self.unet, "unet_config", {}).get("image_size")
        return int(image_size) * self.first_stage.downsample_factor if image_size else 512

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> LatentPipeline:
        """Move every component to `device`; cast UNet and VAE weights to `dtype` (the text encoder too on GPU)."""
        for module in (self.unet, self.first_stage):
            module.to(device=device, dtype=dtype)
        text_dtype = (
            dtype if dtype is not None and device is not None and torch.device(device).type != "cpu" else None
        )
        for encoder in self.text_encoders.values():
            encoder.to(device=device, dtype=text_dtype)
        return self

    # ------------------------------------------------------------------------------------ building blocks

    def denoiser(
        self, guidance_scale: float, plan: SamplingPlan | None = None, guidance_rescale: float = 0.0
    ) -> nn.Module:
        """The UNet as `D(x, sigma, cond) -> x0` as `plan` needs it, wrapped in classifier-free guidance (with
        diffusers' `guidance_rescale`) when scale > 1."""
        options = plan.denoiser_options() if plan is not None else {}
        inner = DiscreteDenoiser(self.unet, self.schedule, self.prediction, **options).to(self.device)
        return CFGDenoiser(inner, guidance_scale, guidance_rescale) if guidance_scale > 1 else inner

    def conditioning(
        self,
        prompts: list[str],
        negative_prompt: str | list[str] | None,
        num_images: int,
        guidance_scale: float,
        size: tuple[int, int] | None = None,
        micro: MicroConditioning | None = None,
    ) -> dict[str, torch.Tensor]:
        """cond dict for the (CFG) denoiser; each prompt repeated `num_images` times in a row, as diffusers does.

        `size` (height, width) of the images and `micro` feed the size embedders (SDXL); the unconditional branch
        is `uncond_<key>` for every entry (`context`, `y`): the negative prompts' encoding, or zeros for the
        text when no negative prompt is given and the conditioner drops text to zeros."""
        micro = micro or MicroConditioning()
        height, width = size or (self.default_size, self.default_size)
        count = len(prompts)
        batch = {"captions": prompts, **size_inputs(self.conditioner, micro, height, width, count)}
        cond = self.conditioner.encode(batch, self.device)
        if guidance_scale > 1:
            negatives = negative_prompts(negative_prompt, count)
            zero_text = negative_prompt is None and self.conditioner.zeros_for_empty_negative
            uncond_batch = {
                "captions": negatives,
                **size_inputs(self.conditioner, micro, height, width, count, negative=True),
            }
            uncond = self.conditioner.encode(uncond_batch, self.device, zero_text=zero_text)
            cond |= {f"uncond_{k}": v for k, v in uncond.items()}
        return {k: v.repeat_interleave(num_images, dim=0) for k, v in cond.items()}

    def plan(self, sampler: str | None, steps: int, use_karras_sigmas: bool = False) -> SamplingPlan:
        """The sampling plan of `sampler` (default: the scheduler config's) for `steps` steps."""
        if not isinstance(steps, int) or steps < 1:
            raise InvalidInputError(f"steps: expected an integer >= 1, got {steps!r}")
        return make_plan(
            sampler or self.default_sampler, self.scheduler_config, steps, use_karras_sigmas, self.schedule
        )

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) with defaults filled; InvalidInputError unless both are multiples of `size_multiple`."""
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        m = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % m:
                raise InvalidInputError(
                    f"{name}: {value!r} is not a positive multiple of {m} (VAE factor "
                    f"{self.first_stage.downsample_factor} x UNet downsampling {m // self.first_stage.downsample_factor})"
                )
        return height, width

    @staticmethod
    def make_generator(
        seed: int | None, generator: Generators, rows: int | None = None
    ) -> torch.Generator | list[torch.Generator]:
        """`generator` (one, or a list with one per output image, `rows` of them) when given, else one seeded by
        `seed`."""
        if isinstance(generator, torch.Generator):
            return generator
        if generator is not None:
            generator = list(generator)
            if rows is not None and len(generator) != rows:
                raise InvalidInputError(
                    f"generator: {len(generator)} generators for {rows} images; expected one per image"
                )
            return generator
        if seed is None:
            seed = random.randrange(2**63)
        elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise InvalidInputError(f"seed: {seed!r}; expected an integer in [0, 2**64)")
        return torch.Generator("cpu").manual_seed(seed)

    @staticmethod
    def sampler_options(sampler: str, eta: float | None) -> dict[str, Any]:
        """`eta` for the samplers that take it (None: the sampler's own default); eta elsewhere is an error."""
        if eta is None:
            return {}
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < float("inf"):
            raise InvalidInputError(f"eta: {eta!r}; expected a finite number >= 0")
        if "eta" in inspect.signature(get_sampler(sampler)).parameters:
            return {"eta": float(eta)}
        if eta:
            raise InvalidInputError(
                f"eta: {eta} is not used by sampler {sampler!r}; expected 0 or unset (ddim, euler_ancestral, "
                "dpmpp_2m_sde take eta)"
            )
        return {}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> pixels (B, 3, H, W) float32 in [0, 1] on the CPU."""
        images = self.first_stage.decode(latents.to(self.device))
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    # ------------------------------------------------------------------------------------ public API

    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int = DEFAULT_STEPS,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        num_images: int = 1,
        latents: torch.Tensor | None = None,
        use_karras_sigmas: bool = False,
        eta: float | None = None,
        progress: bool = True,
        generator: Generators = None,
        callback: Callback | None = None,
        denoising_end: float | None = None,
        output_type: str = "pil",
        guidance_rescale: float = 0.0,
        **micro_conditioning: Any,
    ) -> GenerationOutput:
        """Text-to-image. `latents` (B, C, h, w) are unit-variance initial noise (diffusers' `latents=`), with
        B = len(prompts) * num_images; when None they are drawn from `generator` (or `seed`). `generator` may be a
        list of B generators: each image then draws all its noise from its own, so it is the same whatever else
        shares its batch. `eta` None keeps the sampler's default (ancestral samplers: 1, DDIM: 0).
        `callback(i, sigma, x, x0)` runs after each step's model evaluation (see `t2i.diffusion.samplers`).
        `guidance_rescale` in [0, 1]: diffusers' rescaled guidance, for zero-terminal-SNR models (0 = off).

        SDXL: `micro_conditioning` takes diffusers' keywords (`original_size`, `crops_coords_top_left`,
        `target_size`, `aesthetic_score` and their `negative_` forms; see `t2i.pipelines.conditioning`).
        `denoising_end` (0, 1) stops before the steps whose timestep is below `(1 - denoising_end) * T`
        (diffusers' cutoff) and, with `output_type="latent"`, returns the still-noisy latents for a refiner's
        `reconstruct(image=latents, denoising_start=...)`."""
        self.require_unet("generate", "generate()")
        prompts = normalize_prompts(prompt)
        guidance_scale = self.default_guidance if guidance_scale is None else check_guidance_scale(guidance_scale)
        micro = micro_conditioning_of(micro_conditioning)
        check_num_images(num_images)
        height, width = self.check_size(height, width)
        plan = self.plan(sampler, steps, use_karras_sigmas)
        if denoising_end is not None:
            plan = head_plan(plan, self.schedule, denoising_end)
        options = self.sampler_options(plan.sampler, eta)
        shape = self.latent_shape(len(prompts) * num_images, height, width)
        generator = self.make_generator(seed, generator, shape[0])
        latents = self.initial_noise(latents, shape, generator)
        cond = self.conditioning(prompts, negative_prompt, num_images, guidance_scale, (height, width), micro)
        x = plan.sample(
            self.denoiser(guidance_scale, plan, check_rescale(guidance_rescale)),
            latents.to(self.device, torch.float32),
            cond,
            generator=generator,
            callback=callback,
            progress=progress,
            **options,
        )
        return self.output(x, output_type)

    def output(self, latents: torch.Tensor, output_type: str) -> GenerationOutput:
        """`pil`: decoded images and pixels; `latent`: the latents alone."""
        if output_type == "latent":
            return GenerationOutput([], latents, None)
        if output_type != "pil":
            raise InvalidInputError(f"output_type: {output_type!r}; expected pil or latent")
        pixels = self.decode(latents)
        return GenerationOutput(to_pil(pixels), latents, pixels)

    @torch.no_grad()
    def reconstruct(
        self,
        prompt: str | list[str],
        image: Any,
        strength: float = 0.6,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int = DEFAULT_STEPS,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        use_karras_sigmas: bool = False,
        eta: float | None = None,
        progress: bool = True,
        generator: Generators = None,
        callback: Callback | None = None,
        denoising_start: float | None = None,
        output_type: str = "pil",
        guidance_rescale: float = 0.0,
        **micro_conditioning: Any,
    ) -> GenerationOutput:
        """Image-to-image (SDEdit): encode `image`, noise it to the sigma `strength` of the way into the plan
        (diffusers' img2img `get_timesteps`: skip the first `steps - int(steps * strength)` steps), denoise.

        `image`: a PIL image, a list of them (one per prompt), a tensor (B, 3, H, W) in [0, 1], or latents
        (B, latent channels, h, w) scaled as `generate(output_type="latent")` returns them.
        `generator` and `callback` as in `generate` (a list: one generator per prompt).
        `denoising_start` (0, 1), with latents from a base's `generate(denoising_end=...)`: the refiner half of
        an ensemble of experts. It replaces `strength`, and the latents are taken as they are (no noise added).
        `micro_conditioning`: as in `generate`; sizes default to the image's. `generator` and `callback` as in
        `generate` (a list: one generator per prompt).
        """
        self.require_unet("generate", "reconstruct()")
        prompts = normalize_prompts(prompt)
        guidance_scale = self.default_guidance if guidance_scale is None else check_guidance_scale(guidance_scale)
        micro = micro_conditioning_of(micro_conditioning)
        check_strength(strength)
        plan = self.plan(sampler, steps, use_karras_sigmas)
        options = self.sampler_options(plan.sampler, eta)
        generator = self.make_generator(seed, generator, len(prompts))
        given_latents = self.given_latents(image, len(prompts))
        if denoising_start is not None:
            if given_latents is None:
                raise InvalidInputError(
                    "image: denoising_start needs latents from generate(denoising_end=..., output_type='latent')"
                )
            tail = tail_plan(plan, refiner_start(plan, self.schedule, denoising_start))
            x = latents_to_sampler_scale(given_latents.to(self.device, torch.float32), tail)
        else:
            tail = strength_tail(plan, steps, strength)
            if given_latents is None:
                pixels = self.prepare_images(image, len(prompts), height, width)
                z0 = self.encode_images(pixels.to(self.device) * 2 - 1, generator).float()
            else:
                z0 = given_latents.to(self.device, torch.float32)
            noise = randn(z0.shape, generator)
            x = z0 + float(tail.sigmas[0]) * noise.to(z0.device)
        f = self.first_stage.downsample_factor
        size = (int(x.shape[2]) * f, int(x.shape[3]) * f)
        cond = self.conditioning(prompts, negative_prompt, 1, guidance_scale, size, micro)
        x = tail.sample(
            self.denoiser(guidance_scale, tail, check_rescale(guidance_rescale)), x, cond, generator=generator,
            callback=callback, progress=progress,
            **options,
        )  # fmt: skip
        return self.output(x, output_type)

    def encode_images(self, images: torch.Tensor, generator: Generators) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> sampled latents; with a list, row i's sample from generator i."""
        if not isinstance(generator, list):
            return self.first_stage.encode(images, generator=generator)
        mean, logvar = self.first_stage.encode_moments(images)
        return torch.cat(
            [self.first_stage.z_from_moments(mean[i : i + 1], logvar[i : i + 1], g) for i, g in enumerate(generator)]
        )

    def given_latents(self, image: Any, count: int) -> torch.Tensor | None:
        """`image` when it is a latent tensor (B, latent channels, h, w) of a valid size, expanded to `count`."""
        channels = self.first_stage.latent_channels
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != channels or channels == 3:
            return None
        f = self.first_stage.downsample_factor
        self.check_size(int(image.shape[2]) * f, int(image.shape[3]) * f)
        if image.shape[0] == 1:
            image = image.expand(count, -1, -1, -1)
        if image.shape[0] != count:
            raise InvalidInputError(f"image: {image.shape[0]} latents for {count} prompts; expected 1 or {count}")
        return image

    def prepare_images(self, image: Any, count: int, height: int | None, width: int | None) -> torch.Tensor:
        """PIL image(s) or a [0, 1] tensor -> (count, 3, H, W) float32 in [0, 1] at a valid size."""
        if isinstance(image, torch.Tensor):
            pixels = image.unsqueeze(0) if image.ndim == 3 else image
            if pixels.ndim != 4 or pixels.shape[1] != 3:
                raise InvalidInputError(
                    f"image: tensor of shape {tuple(image.shape)}; expected (B, 3, H, W) in [0, 1]"
                )
            pixels = pixels.float()
            size = (height or pixels.shape[2], width or pixels.shape[3])
            if size != tuple(pixels.shape[2:]):
                pixels = torch.nn.functional.interpolate(pixels, size=size, mode="bilinear", antialias=True)
        else:
            pixels = self.pil_to_pixels(image, height, width)
        self.check_size(int(pixels.shape[2]), int(pixels.shape[3]))
        if pixels.shape[0] == 1:
            pixels = pixels.expand(count, -1, -1, -1)
        if pixels.shape[0] != count:
            raise InvalidInputError(
                f"image: {pixels.shape[0]} images for {count} prompts; expected 1 or {count}"
            )
        return pixels

    def pil_to_pixels(self, image: Any, height: int | None, width: int | None) -> torch.Tensor:
        """PIL image(s) -> (B, 3, H, W) in [0, 1]; without an explicit size, rounded down to a valid multiple."""
        from PIL import Image

        images = image if isinstance(image, (list, tuple)) else [image]
        if not images or not all(isinstance(i, Image.Image) for i in images):
            raise InvalidInputError(
                f"image: expected a PIL image, a list of them or a tensor, got {type(image).__name__}"
            )
        m = self.size_multiple
        arrays = []
        for img in images:
            w = width or max(m, img.width // m * m)
            h = height or max(m, img.height // m * m)
            img = img.convert("RGB")
            if img.size != (w, h):
                img = img.resize((w, h), Image.LANCZOS)
            arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
        if len({a.shape for a in arrays}) != 1:
            raise InvalidInputError("image: the images differ in size; give height and width")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a t2i pipeline folder: the diffusers layout (loads in `StableDiffusionPipeline`, SDXL in
        `StableDiffusionXLPipeline` / the refiner in `StableDiffusionXLImg2ImgPipeline`) + `t2i.yaml`."""
        if "text_encoder_2" in self.text_encoders:
            from t2i.pipelines.sdxl_folder import save_sdxl_pipeline

            return save_sdxl_pipeline(self, path)
        from t2i.pipelines.sd_folder import save_pipeline

        return save_pipeline(self, path)

    def save_single_file(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write one original-layout `.safetensors` checkpoint (CompVis for SD 1/2, sgm for SDXL) that diffusers'
        `from_single_file` and `t2i.load_pipeline(path, config=...)` read (`t2i.pipelines.single_file_save`)."""
        from t2i.pipelines.single_file_save import save_single_file

        return save_single_file(self, path, dtype)
