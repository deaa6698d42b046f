"""Tiny random Stable Diffusion pipelines built with diffusers + transformers (the independent reference).

Nothing is downloaded: the CLIP tokenizer is built from a byte-level vocabulary and a few merges.
SD1 style: conv projections in the transformers, epsilon prediction, PNDM scheduler (as SD 1.5 ships).
SD2 style: linear projections, v prediction, DDIM scheduler with `trailing` spacing, steps_offset 0.
"""

from __future__ import annotations

from pathlib import Path

import torch

MAX_LENGTH = 16
SIZE = 32  # pixels; the tiny VAE downsamples by 2, so latents are 16 x 16


def gpt2_byte_chars() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE (GPT-2, CLIP) uses for raw bytes."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_clip_tokenizer(max_length: int = MAX_LENGTH):
    """A CLIP tokenizer over the byte alphabet plus the merges spelling "red" and "circle"."""
    from transformers import CLIPTokenizer

    chars = gpt2_byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    merges = [
        ("r", "e"),
        ("re", "d</w>"),
        ("c", "i"),
        ("ci", "r"),
        ("cir", "c"),
        ("circ", "l"),
        ("circl", "e</w>"),
    ]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


# The tiny UNet's blocks: one level without attention, one with (latents 16 x 16).
UNET_BLOCKS = {
    "sample_size": SIZE // 2,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}


def tiny_vae(**overrides):
    """A random diffusers AutoencoderKL downsampling by 2 (4 latent channels)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        **{
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "latent_channels": 4,
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "sample_size": SIZE,
            **overrides,
        }
    )


def tiny_diffusers_pipeline(style: str):
    """A random diffusers StableDiffusionPipeline: `sd1` (eps, conv proj) or `sd2` (v, linear proj, 2 heads...)."""
    from diffusers import (
        DDIMScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0 if style == "sd1" else 1)
    sd2 = style == "sd2"
    unet = UNet2DConditionModel(
        **UNET_BLOCKS,
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if sd2 else 4,
        use_linear_projection=sd2,
    )
    vae = tiny_vae()
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=521,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            hidden_act="gelu" if sd2 else "quick_gelu",
        )
    ).eval()
    schedule = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
    }
    if sd2:
        scheduler = DDIMScheduler(
            **schedule,
            prediction_type="v_prediction",
            timestep_spacing="trailing",
            steps_offset=0,
            set_alpha_to_one=False,
            clip_sample=False,
        )
    else:
        # SD 1.5's scheduler_config.json: PNDM, plus `clip_sample: false`, which DDIM inherits via from_config.
        scheduler = PNDMScheduler.from_config(
            {
                **schedule,
                "skip_prk_steps": True,
                "steps_offset": 1,
                "set_alpha_to_one": False,
                "clip_sample": False,
            }
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def initial_latents(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(seed))


_LOADED: dict[str, tuple] = {}


def load_diffusers(folder: Path):
    """StableDiffusionPipeline.from_pretrained(folder), cached, with its original scheduler config."""
    import diffusers

    if str(folder) not in _LOADED:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        _LOADED[str(folder)] = (pipe, pipe.scheduler)
    return _LOADED[str(folder)]


def diffusers_images(folder: Path, sampler_class, prompt, latents, steps: int = 3, **kwargs):
    """Images (B, H, W, 3) in [0, 1] from diffusers' StableDiffusionPipeline; `sampler_class` (a name, or a
    (name, extra config) pair) replaces the folder's scheduler via `from_config`, None keeps it."""
    import diffusers

    pipe, scheduler = load_diffusers(folder)
    pipe.scheduler = scheduler
    if sampler_class is not None:
        scheduler_class, extra = sampler_class if isinstance(sampler_class, tuple) else (sampler_class, {})
        pipe.scheduler = getattr(diffusers, scheduler_class).from_config(scheduler.config, **extra)
    out = pipe(
        prompt,
        num_inference_steps=steps,
        latents=latents,
        height=SIZE,
        width=SIZE,
        output_type="np",
        **kwargs,
    )
    return out.images


def t2i_images(pipe, prompt, latents, steps: int = 3, **kwargs):
    """Images (B, H, W, 3) in [0, 1] from a t2i LatentPipeline (float pixels, before PIL rounding)."""
    out = pipe.generate(
        prompt, latents=latents, height=SIZE, width=SIZE, steps=steps, progress=False, **kwargs
    )
    return out.pixels.permute(0, 2, 3, 1).numpy()


def single_file_from_diffusers(folder, path) -> None:
    """An original SD1 single file (CompVis key names), made from diffusers weights with t2i's converters."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    from t2i.convert.text_keys import hf_to_sd1_text
    from t2i.convert.unet_diffusers import diffusers_to_t2i_state_dict, diffusers_to_unet_config
    from t2i.convert.vae_diffusers import state_dict_from_diffusers

    unet_config = diffusers_to_unet_config(json.loads((folder / "unet" / "config.json").read_text()))
    unet = diffusers_to_t2i_state_dict(
        load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"), unet_config
    )
    vae = state_dict_from_diffusers(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    hf_text = CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict()
    # Original SD1 files name the CLIP weights `...transformer.text_model.*` (the transformers 4 layout).
    text = hf_to_sd1_text({"text_model." + k.removeprefix("text_model."): v for k, v in hf_text.items()})
    state = {
        **{f"model.diffusion_model.{k}": v for k, v in unet.items()},
        **{f"first_stage_model.{k}": v for k, v in vae.items()},
        **text,
        "alphas_cumprod": torch.ones(1000),  # a schedule buffer, as CompVis files carry; ignored
    }
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return unet_config


def tiny_sd1_yaml(folder, unet_config, path) -> None:
    """The t2i config describing the tiny SD1 architecture; the tokenizer/config come from `folder`."""
    import json

    from omegaconf import OmegaConf

    from t2i.convert.vae_diffusers import config_from_diffusers

    vae = config_from_diffusers(json.loads((folder / "vae" / "config.json").read_text()))
    model = {
        "kind": "latent_diffusion",
        "parameterization": "eps",
        "scale_factor": vae["scale_factor"],
        "unet_config": unet_config,
        "first_stage_config": {"embed_dim": vae["embed_dim"], "ddconfig": vae["ddconfig"]},
        "cond_stage_config": {"kind": "clip", "path": str(folder), "max_length": 16},
    }
    OmegaConf.save(OmegaConf.create({"model": model}), path)
