"""Inpainting and instruction editing for the SD family, on UNets that take extra input channels.

- `inpaint(prompt, image, mask, strength)`: a 9-channel inpainting UNet (SD 1.5/2 inpainting) sees
  `[latents, mask, masked-image latents]` at every step, as diffusers' `StableDiffusionInpaintPipeline` feeds it:
  the mask is binarised at 0.5 (white = repaint) and resized to the latent grid by nearest neighbour; the masked
  image is the image with the repainted region set to 0 (mid grey), encoded by the VAE (a sample, scaled).
- `edit(instruction, image, image_guidance_scale)`: an 8-channel InstructPix2Pix UNet sees
  `[latents, source-image latents]` (the VAE's mode, unscaled, as InstructPix2Pix was trained), under its
  two-scale guidance (`t2i.diffusion.guidance.ImageTextCFGDenoiser`).

Random draws come from `generator` (or `seed`) in diffusers' order, so the same generator gives diffusers' images:
inpainting with strength < 1 first samples the image's latents, then the noise, then the masked image's latents;
with strength 1 the noise, then the masked image's latents.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from t2i.diffusion.denoisers import DiscreteDenoiser
from t2i.diffusion.guidance import CFGDenoiser, ImageTextCFGDenoiser
from t2i.diffusion.plans import SamplingPlan
from t2i.diffusion.tensors import Generators
from t2i.errors import InvalidInputError
from t2i.models.layers import ConcatInputs
from t2i.pipelines.conditioning import strength_tail
from t2i.pipelines.inputs import check_guidance_scale, check_num_images, check_strength, normalize_prompts

# What a UNet can do, by the channels it takes beyond the latents: inpainting takes a mask (1) + the masked image's
# latents (4), InstructPix2Pix the source image's latents (4).
UNET_TASKS = {0: "generate", 5: "inpaint", 4: "instruct"}
EXTRA_CHANNELS = {task: extra for extra, task in UNET_TASKS.items()}
METHODS = {"generate": "generate() or reconstruct()", "inpaint": "inpaint()", "instruct": "edit()"}
DEFAULT_IMAGE_GUIDANCE = 1.5  # diffusers' StableDiffusionInstructPix2PixPipeline default


class EditingMethods:
    """`inpaint` and `edit` for `LatentPipeline` (a mixin: it uses the pipeline's encoders, plans and
    conditioning)."""

    @property
    def unet_extra_channels(self) -> int:
        """Channels the UNet takes beyond the latents: 0 text-to-image, 5 inpainting, 4 InstructPix2Pix."""
        return int(getattr(self.unet, "in_channels", self.first_stage.latent_channels)) - self.first_stage.latent_channels

    @property
    def unet_task(self) -> str:
        """What the UNet's inputs let it do: `generate` (text-to-image and image-to-image), `inpaint` or
        `instruct` (InstructPix2Pix editing)."""
        return UNET_TASKS.get(self.unet_extra_channels, "generate")

    def require_unet(self, task: str, method: str) -> None:
        """InvalidInputError unless the UNet is made for `task` (what `method` feeds it)."""
        if self.unet_task == task:
            return
        latent = self.first_stage.latent_channels
        raise InvalidInputError(
            f"{method}: this pipeline's UNet takes {latent + self.unet_extra_channels} input channels; {method} "
            f"needs {latent + EXTRA_CHANNELS[task]} (use {METHODS[self.unet_task]})"
        )

    def concat_denoiser(self, plan: SamplingPlan) -> DiscreteDenoiser:
        """The UNet with its extra channels read from `cond['concat']`, as `plan` needs it."""
        return DiscreteDenoiser(
            ConcatInputs(self.unet), self.schedule, self.prediction, **plan.denoiser_options()
        ).to(self.device)

    # ------------------------------------------------------------------------------------ inpainting

    @torch.no_grad()
    def inpaint(
        self,
        prompt: str | list[str],
        image: Any,
        mask: Any,
        strength: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int = 30,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        num_images: int = 1,
        latents: torch.Tensor | None = None,
        use_karras_sigmas: bool = False,
        eta: float | None = None,
        progress: bool = True,
        generator: Generators = None,
        callback: Any = None,
        output_type: str = "pil",
    ):
        """Repaint where `mask` is white (>= 0.5), keep the rest as context. `image`: a PIL image, a list (one per
        prompt) or a tensor (B, 3, H, W) in [0, 1]; `mask`: a PIL image (any mode; read as grey) or a tensor
        (B, 1, H, W) / (H, W) in [0, 1]. `strength` < 1 starts from the image noised that far into the plan
        (diffusers' img2img rule), 1 from pure noise. `latents` (B, C, h, w): unit-variance initial noise."""
        self.require_unet("inpaint", "inpaint()")
        prompts = normalize_prompts(prompt)
        guidance_scale = self.default_guidance if guidance_scale is None else check_guidance_scale(guidance_scale)
        check_num_images(num_images)
        check_strength(strength)
        plan = self.plan(sampler, steps, use_karras_sigmas)
        options = self.sampler_options(plan.sampler, eta)
        pixels = self.prepare_images(image, len(prompts), height, width)
        masks = self.prepare_mask(mask, len(prompts), tuple(pixels.shape[2:]))
        rows = len(prompts) * num_images
        generator = self.make_generator(seed, generator, rows)
        z0, tail = None, plan
        if strength < 1:
            tail = strength_tail(plan, steps, strength)
            z0 = self.encode_rows(pixels * 2 - 1, num_images, generator)
        shape = self.latent_shape(rows, *pixels.shape[2:])
        noise = self.initial_noise(latents, shape, generator).float()
        masked = (pixels.to(self.device) * 2 - 1) * (masks.to(self.device) < 0.5)
        masked_latents = self.encode_rows(masked, num_images, generator)
        small_mask = F.interpolate(masks, size=shape[2:]).to(self.device)
        concat = torch.cat([small_mask.repeat_interleave(num_images, 0), masked_latents], dim=1)
        cond = self.conditioning(prompts, negative_prompt, num_images, guidance_scale, tuple(pixels.shape[2:]))
        cond["concat"] = concat
        inner = self.concat_denoiser(tail)
        denoiser = CFGDenoiser(inner, guidance_scale) if guidance_scale > 1 else inner
        if z0 is None:
            x = tail.sample(denoiser, noise.to(self.device), cond, generator=generator, callback=callback,
                            progress=progress, **options)  # fmt: skip
        else:
            x = z0 + float(tail.sigmas[0]) * noise.to(z0.device)
            x = tail.sample(denoiser, x, cond, generator=generator, callback=callback, progress=progress, **options)
        return self.output(x, output_type)

    def encode_rows(self, images: torch.Tensor, num_images: int, generator: Generators) -> torch.Tensor:
        """Sampled latents of images (n, 3, H, W) in [-1, 1], one per prompt, for every output row: with one
        generator each image is encoded once and repeated (diffusers' draws), with a list of them each row is
        encoded from its own generator."""
        images = images.to(self.device)
        if isinstance(generator, list):
            return self.encode_images(images.repeat_interleave(num_images, 0), generator).float()
        return self.encode_images(images, generator).float().repeat_interleave(num_images, 0)

    def prepare_mask(self, mask: Any, count: int, size: tuple[int, int]) -> torch.Tensor:
        """A PIL mask (any mode, read as grey) or a tensor in [0, 1] -> (count, 1, H, W) of 0 and 1 at `size`."""
        from PIL import Image

        if isinstance(mask, Image.Image):
            grey = mask.convert("L")
            if grey.size != (size[1], size[0]):
                grey = grey.resize((size[1], size[0]), Image.LANCZOS)
            values = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)[None, None]
        elif isinstance(mask, torch.Tensor) and mask.ndim in (2, 3, 4):
            values = mask.float().reshape(-1, 1, *mask.shape[-2:]) if mask.ndim > 2 else mask.float()[None, None]
            if mask.ndim == 3 and mask.shape[0] not in (1, count):
                raise InvalidInputError(f"mask: tensor of shape {tuple(mask.shape)}; expected (B, 1, H, W) or (H, W)")
            if tuple(values.shape[2:]) != size:
                values = F.interpolate(values, size=size, mode="bilinear", antialias=True)
        else:
            raise InvalidInputError(
                f"mask: expected a PIL image or a tensor (B, 1, H, W) / (H, W) in [0, 1], got {type(mask).__name__}"
            )
        if values.shape[0] == 1:
            values = values.expand(count, -1, -1, -1)
        if values.shape[0] != count:
            raise InvalidInputError(f"mask: {values.shape[0]} masks for {count} prompts; expected 1 or {count}")
        return (values >= 0.5).float()

    # ------------------------------------------------------------------------------------ instruction editing

    @torch.no_grad()
    def edit(
        self,
        instruction: str | list[str],
        image: Any,
        image_guidance_scale: float = DEFAULT_IMAGE_GUIDANCE,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        steps: int = 30,
        sampler: str | None = None,
        seed: int | None = None,
        num_images: int = 1,
        latents: torch.Tensor | None = None,
        use_karras_sigmas: bool = False,
        eta: float | None = None,
        progress: bool = True,
        generator: Generators = None,
        callback: Any = None,
        output_type: str = "pil",
    ):
        """Edit `image` as `instruction` says ("make it blue"), InstructPix2Pix style. `image_guidance_scale` pulls
        towards the source image, `guidance_scale` towards the instruction; guidance runs when
        guidance_scale > 1 and image_guidance_scale >= 1 (diffusers' rule), else one conditional pass."""
        self.require_unet("instruct", "edit()")
        prompts = normalize_prompts(instruction, "instruction")
        guidance_scale = self.default_guidance if guidance_scale is None else check_guidance_scale(guidance_scale)
        image_guidance_scale = check_guidance_scale(image_guidance_scale)
        check_num_images(num_images)
        guided = guidance_scale > 1 and image_guidance_scale >= 1
        plan = self.plan(sampler, steps, use_karras_sigmas)
        options = self.sampler_options(plan.sampler, eta)
        pixels = self.prepare_images(image, len(prompts), None, None)
        source = self.first_stage.encode_moments(pixels.to(self.device) * 2 - 1)[0].float()
        rows = len(prompts) * num_images
        generator = self.make_generator(seed, generator, rows)
        shape = self.latent_shape(rows, *pixels.shape[2:])
        noise = self.initial_noise(latents, shape, generator).float()
        cond = self.conditioning(prompts, negative_prompt, num_images, 2.0 if guided else 1.0, tuple(pixels.shape[2:]))
        cond["concat"] = source.repeat_interleave(num_images, 0)
        inner = self.concat_denoiser(plan)
        denoiser = ImageTextCFGDenoiser(inner, guidance_scale, image_guidance_scale) if guided else inner
        x = plan.sample(denoiser, noise.to(self.device), cond, generator=generator, callback=callback,
                        progress=progress, **options)  # fmt: skip
        return self.output(x, output_type)

