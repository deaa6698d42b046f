"""Tiny random diffusers FluxPipelines (the independent reference), built here and saved with diffusers.

Nothing is downloaded: the CLIP tokenizer is sd_helpers' byte-level one, the T5 tokenizer a Unigram model over a
few words built with `tokenizers`. Transformer: 2 double + 2 single blocks, 2 heads of 16 (RoPE 4 + 6 + 6); a
16-channel VAE without quant convs and FLUX.1's latent scale and shift; CLIP and T5 of width 32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from sd_helpers import tiny_clip_tokenizer

SIZE = 32  # pixels; the VAE downsamples by 2, so latents are 16 x 16 and the transformer sees 8 x 8 tokens
LATENT = (16, SIZE // 2, SIZE // 2)
T5_LENGTH = 24
CLIP_LENGTH = 16
WORDS = ["a", "red", "blue", "circle", "square", "in", "the", "top", "left", "blurry", "photo", "of"]


def tiny_t5_tokenizer():
    """A T5 (Unigram, Metaspace, `</s>` appended) tokenizer over WORDS and the letters, pad 0 / eos 1 / unk 2."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return transformers.T5TokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
        model_max_length=T5_LENGTH,
    )  # fmt: skip


@dataclass(frozen=True)
class FluxDims:
    """Sizes of a random FluxPipeline (the tests' tiny one by default; the benchmark passes larger ones)."""

    heads: int = 2
    head_dim: int = 16
    axes: tuple[int, int, int] = (4, 6, 6)
    double: int = 2
    single: int = 2
    text_width: int = 32
    vae_channels: tuple[int, ...] = (32, 64)
    size: int = SIZE


def tiny_flux_pipeline(guidance: bool = True, seed: int = 0, shift: bool = True, dims: FluxDims = FluxDims()):
    """A random diffusers FluxPipeline: guidance-distilled (FLUX.1-dev-like, dynamic shift) or not (schnell-like)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=dims.double,
        num_single_layers=dims.single,
        attention_head_dim=dims.head_dim,
        num_attention_heads=dims.heads,
        joint_attention_dim=dims.text_width,
        pooled_projection_dim=dims.text_width,
        guidance_embeds=guidance,
        axes_dims_rope=list(dims.axes),
    )
    with torch.no_grad():  # diffusers leaves some layers at zero; random everywhere makes every weight count
        for p in transformer.parameters():
            p.normal_(0.0, 0.08 if p.ndim > 1 else 0.05)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=dims.vae_channels,
        layers_per_block=1,
        latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * len(dims.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(dims.vae_channels),
        sample_size=dims.size,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=521, hidden_size=dims.text_width, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CLIP_LENGTH, hidden_act="quick_gelu",
        )
    ).eval()  # fmt: skip
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=42, d_model=dims.text_width, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
        )
    ).eval()  # fmt: skip
    schedule = {"use_dynamic_shifting": True, "shift": 3.0} if shift else {"shift": 1.0}
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, base_image_seq_len=16, max_image_seq_len=256, **schedule
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=clip,
        tokenizer=tiny_clip_tokenizer(CLIP_LENGTH),
        text_encoder_2=t5,
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=transformer.eval(),
    )


def save_tiny(folder: Path, **kwargs) -> Path:
    """`tiny_flux_pipeline(**kwargs)` saved as a diffusers folder."""
    tiny_flux_pipeline(**kwargs).save_pretrained(str(folder))
    return folder


def initial_latents(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, *LATENT), generator=torch.Generator().manual_seed(seed))


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, HW/4, 4C): what diffusers' FluxPipeline takes as `latents=`."""
    from t2i.models.flux import pack_latents

    return pack_latents(latents)


_LOADED: dict[str, object] = {}


def load_diffusers(folder: Path):
    import diffusers

    if str(folder) not in _LOADED:
        pipe = diffusers.FluxPipeline.from_pretrained(str(folder))
        pipe.set_progress_bar_config(disable=True)
        _LOADED[str(folder)] = pipe
    return _LOADED[str(folder)]


def diffusers_images(folder: Path, prompt, latents: torch.Tensor | None, steps: int = 3, **kwargs):
    """Images (B, H, W, 3) in [0, 1] from diffusers' FluxPipeline (latents unpacked here, packed for it)."""
    pipe = load_diffusers(folder)
    out = pipe(
        prompt,
        num_inference_steps=steps,
        latents=None if latents is None else pack(latents),
        height=SIZE,
        width=SIZE,
        max_sequence_length=T5_LENGTH,
        output_type="np",
        **kwargs,
    )
    return out.images


def t2i_images(pipe, prompt, latents: torch.Tensor | None, steps: int = 3, **kwargs):
    """Images (B, H, W, 3) in [0, 1] from a t2i FluxPipeline (float pixels, before PIL rounding)."""
    out = pipe.generate(prompt, latents=latents, height=SIZE, width=SIZE, steps=steps, progress=False, **kwargs)
    return out.pixels.permute(0, 2, 3, 1).numpy()
