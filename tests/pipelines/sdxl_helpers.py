"""Tiny random SDXL pipelines built with diffusers + transformers (the independent reference).

Base: `StableDiffusionXLPipeline` with two text encoders (a CLIPTextModel and a CLIPTextModelWithProjection whose
tokenizer pads with "!"), a `text_time` UNet (y = pooled 32 + 6 time ids x 8 = 80) and the released base's
scheduler config (Euler, leading spacing, steps_offset 1). Refiner: `StableDiffusionXLImg2ImgPipeline` with the
second encoder only, `requires_aesthetics_score` (5 time ids: y = 32 + 40 = 72) and
`force_zeros_for_empty_prompt: false`, as the released refiner folder says.
"""

from __future__ import annotations

from pathlib import Path

import torch
from sd_helpers import MAX_LENGTH, SIZE, tiny_clip_tokenizer

TIME_DIM = 8  # addition_time_embed_dim (256 in the released models)
TEXT_DIM = 32
POOLED_DIM = 32
SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}


def randomized(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Small random values everywhere (norms around 1), so every weight, zero-initialised ones included, counts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * std
            p.copy_(1 + noise if name.endswith("weight") and p.ndim == 1 else noise if "bias" in name else p + noise)
    return module.eval()


def tiny_text_encoders(seed: int = 0):
    """(CLIPTextModel, CLIPTextModelWithProjection) as SDXL's text_encoder / text_encoder_2, tiny."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = {
        "vocab_size": 521,
        "hidden_size": TEXT_DIM,
        "intermediate_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_LENGTH,
        "eos_token_id": 520,
    }
    torch.manual_seed(seed)
    first = CLIPTextModel(CLIPTextConfig(**common, hidden_act="quick_gelu")).eval()
    second = CLIPTextModelWithProjection(
        CLIPTextConfig(**common, hidden_act="gelu", projection_dim=POOLED_DIM)
    ).eval()
    return first, second


def tiny_tokenizer_2():
    """The second tokenizer: SDXL's tokenizer_2 pads with "!" instead of <|endoftext|>."""
    tokenizer = tiny_clip_tokenizer()
    tokenizer.pad_token = "!"
    return tokenizer


def tiny_sdxl_unet(refiner: bool, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    time_ids = 5 if refiner else 6
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=TEXT_DIM if refiner else 2 * TEXT_DIM,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=POOLED_DIM + time_ids * TIME_DIM,
        norm_num_groups=8,
    )
    return randomized(unet, seed + 100)


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=SIZE,
        scaling_factor=0.13025,
    ).eval()


def tiny_sdxl_pipeline(refiner: bool = False):
    """A random diffusers StableDiffusionXLPipeline (base) or StableDiffusionXLImg2ImgPipeline (refiner)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    first, second = tiny_text_encoders(seed=7 if refiner else 0)
    components = {
        "vae": tiny_vae(),
        "text_encoder_2": second,
        "tokenizer_2": tiny_tokenizer_2(),
        "unet": tiny_sdxl_unet(refiner, seed=11 if refiner else 0),
        "scheduler": EulerDiscreteScheduler(**SCHEDULER),
    }
    if refiner:
        return StableDiffusionXLImg2ImgPipeline(
            text_encoder=None,
            tokenizer=None,
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
            add_watermarker=False,
            **components,
        )
    return StableDiffusionXLPipeline(
        text_encoder=first, tokenizer=tiny_clip_tokenizer(), add_watermarker=False, **components
    )


_LOADED: dict[str, object] = {}


def load_diffusers_sdxl(folder: Path, img2img: bool = False):
    """The diffusers pipeline of `folder` (cached), as StableDiffusionXL(Img2Img)Pipeline."""
    import diffusers

    key = f"{folder}:{img2img}"
    if key not in _LOADED:
        cls = diffusers.StableDiffusionXLImg2ImgPipeline if img2img else diffusers.StableDiffusionXLPipeline
        pipe = cls.from_pretrained(str(folder), add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        _LOADED[key] = (pipe, pipe.scheduler)
    return _LOADED[key]


def with_scheduler(pipe, scheduler, sampler_class):
    """`pipe` with its scheduler replaced via `from_config` (a class name or a (name, extra) pair; None keeps)."""
    import diffusers

    pipe.scheduler = scheduler
    if sampler_class is not None:
        name, extra = sampler_class if isinstance(sampler_class, tuple) else (sampler_class, {})
        pipe.scheduler = getattr(diffusers, name).from_config(scheduler.config, **extra)
    return pipe
