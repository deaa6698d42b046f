"""Flux LoRA files in the three namings, against diffusers' FluxPipeline.load_lora_weights (the reference) on the
same tiny random weights: a LoRA t2i builds loads in diffusers and changes the images exactly as in t2i; a LoRA
diffusers/peft builds on its split q/k/v modules loads in t2i (fused exactly); kohya-ss and BFL-named files land
on the same modules; unknown or unmatched keys are errors naming them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import t2i
from t2i.errors import LoraError
from t2i.lora import apply_lora, save_lora_file
from t2i.lora.peft_lora import lora_layers, lora_weights, resolve_targets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from flux_pipeline_helpers import SIZE, T5_LENGTH, initial_latents, save_tiny, t2i_images

diffusers = pytest.importorskip("diffusers")
TOLERANCE = 1e-4  # float32 pixels
PROMPT = "a red circle in the top left"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("flux-lora"), guidance=True)


def load(folder):
    pipe = t2i.load_pipeline(folder)
    pipe.context_encoder.max_length = T5_LENGTH
    return pipe


def diffusers_pipe(folder):
    pipe = diffusers.FluxPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(pipe, latents):
    from t2i.models.flux import pack_latents

    return pipe(
        PROMPT, num_inference_steps=3, latents=pack_latents(latents), height=SIZE, width=SIZE,
        max_sequence_length=T5_LENGTH, guidance_scale=3.5, output_type="np",
    ).images  # fmt: skip


def images(pipe, latents):
    return t2i_images(pipe, PROMPT, latents, guidance_scale=3.5)


EVERYWHERE = ["attention", "ff", "img_mod.lin", "modulation.lin", "final_layer.adaLN_modulation.1",
              "final_layer.linear"]  # fmt: skip


def t2i_lora(pipe, seed: int = 0, targets: list[str] = EVERYWHERE) -> None:
    """A rank-3 LoRA (alpha 6) on `targets` (default: every Flux target group plus the modulations and the final
    layer), random up weights."""
    apply_lora(pipe.transformer, rank=3, alpha=6.0, target_modules=resolve_targets(pipe.transformer, targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(pipe.transformer):
            for b in layer.lora_B.values():
                b.weight.copy_(torch.randn(b.weight.shape, generator=gen) * 0.3)


def test_a_t2i_lora_loads_in_diffusers_and_changes_images_as_in_t2i(folder, tmp_path):
    latents = initial_latents(seed=1)
    pipe = load(folder)
    base = images(pipe, latents)
    t2i_lora(pipe)
    adapted = images(pipe, latents)
    assert np.abs(adapted - base).max() > 0.02  # the LoRA matters
    path = save_lora_file(pipe, tmp_path / "t2i-lora.safetensors")
    assert any(k.startswith("transformer.transformer_blocks.0.attn.to_q.") for k in load_file(path))
    reference = diffusers_pipe(folder)
    reference.load_lora_weights(str(path))
    np.testing.assert_allclose(diffusers_images(reference, latents), adapted, rtol=0, atol=TOLERANCE)
    fresh = load(folder)
    fresh.load_lora(path)
    np.testing.assert_allclose(images(fresh, latents), adapted, rtol=0, atol=TOLERANCE)


def test_a_diffusers_lora_on_split_modules_loads_fused(folder, tmp_path):
    """peft LoRA on diffusers' to_q / to_k / to_v / proj_mlp with different down weights: t2i fuses them into
    qkv and linear1 (stacked down weights, block-diagonal up weights) and reproduces diffusers' images."""
    from peft import LoraConfig

    latents = initial_latents(seed=2)
    reference = diffusers_pipe(folder)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_v_proj", "to_add_out", "proj_mlp",
               "ff.net.0.proj", "norm1.linear", "norm_out.linear"]  # fmt: skip
    # alpha = r: files saved without adapter metadata mean scale 1 (what diffusers reads back too)
    reference.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    path = tmp_path / "diffusers-lora.safetensors"
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(reference.transformer)
    diffusers.FluxPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=state,
                                             weight_name=path.name)  # fmt: skip
    expected = diffusers_images(reference, latents)
    pipe = load(folder)
    base = images(pipe, latents)
    pipe.load_lora(path)
    ours = images(pipe, latents)
    assert np.abs(ours - base).max() > 0.02
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOLERANCE)
    fused = lora_weights(pipe.transformer, "diffusers_lora")["double_blocks.0.img_attn.qkv"]
    assert fused[0].shape[0] == 6  # q, k, v each of rank 2


def kohya_and_bfl_files(pipe, tmp_path) -> tuple[Path, Path]:
    """The adapter of `pipe` written by t2i in kohya naming, and rewritten by hand in BFL/ComfyUI naming."""
    kohya = save_lora_file(pipe, tmp_path / "kohya.safetensors", naming="kohya")
    state = {}
    for path, (down, up, ratio) in lora_weights(pipe.transformer).items():
        state[f"diffusion_model.{path}.lora_down.weight"] = down.detach().contiguous()
        state[f"diffusion_model.{path}.lora_up.weight"] = up.detach().contiguous()
        state[f"diffusion_model.{path}.alpha"] = torch.tensor(ratio * down.shape[0])
    bfl = tmp_path / "bfl.safetensors"
    save_file(state, str(bfl))
    return kohya, bfl


def test_kohya_and_bfl_named_files_land_on_the_same_modules(folder, tmp_path):
    latents = initial_latents(seed=3)
    pipe = load(folder)
    t2i_lora(pipe, seed=4)
    expected = images(pipe, latents)
    kohya, bfl = kohya_and_bfl_files(pipe, tmp_path)
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in load_file(kohya))
    for file in (kohya, bfl):
        fresh = load(folder)
        fresh.load_lora(file)
        np.testing.assert_allclose(images(fresh, latents), expected, rtol=0, atol=TOLERANCE)


def test_diffusers_reads_our_kohya_files_the_same_way(folder, tmp_path):
    """diffusers converts sd-scripts' Flux files with FLUX.1's widths written in (single blocks' linear1 split at
    3072), so the tiny model's file leaves linear1 out."""
    latents = initial_latents(seed=6)
    pipe = load(folder)
    t2i_lora(pipe, seed=7, targets=["img_attn.qkv", "txt_attn.proj", "img_mlp.0", "linear2", "txt_mod.lin"])
    expected = images(pipe, latents)
    kohya = save_lora_file(pipe, tmp_path / "kohya.safetensors", naming="kohya")
    reference = diffusers_pipe(folder)
    reference.load_lora_weights(str(kohya))
    np.testing.assert_allclose(diffusers_images(reference, latents), expected, rtol=0, atol=TOLERANCE)


def test_fuse_and_unfuse_on_the_transformer(folder, tmp_path):
    latents = initial_latents(seed=5)
    pipe = load(folder)
    t2i_lora(pipe)
    path = save_lora_file(pipe, tmp_path / "a.safetensors")
    fresh = load(folder)
    base = images(fresh, latents)
    fresh.load_lora(path, scale=0.5)
    half = images(fresh, latents)
    fresh.fuse_lora()
    np.testing.assert_allclose(images(fresh, latents), half, rtol=0, atol=TOLERANCE)
    fresh.unfuse_lora()
    fresh.unload_lora()
    np.testing.assert_allclose(images(fresh, latents), base, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        ("transformer.transformer_blocks.0.attn.to_z.lora_A.weight", "transformer.transformer_blocks.0.attn.to_z"),
        ("lora_unet_double_blocks_9_img_attn_qkv.lora_down.weight", "lora_unet_double_blocks_9_img_attn_qkv"),
        ("double_blocks.0.img_attn.nope.lora_A.weight", "transformer.double_blocks.0.img_attn.nope"),
        ("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight", "text_encoder_2"),
    ],
)
def test_unmatched_keys_are_errors_that_name_them(folder, tmp_path, key, shown):
    up_key = key.replace("lora_A", "lora_B").replace("lora_down", "lora_up")
    path = tmp_path / "bad.safetensors"
    save_file({key: torch.zeros(2, 32), up_key: torch.zeros(32, 2)}, str(path))
    with pytest.raises(LoraError, match=shown.replace(".", r"\.")):
        load(folder).load_lora(path)


def test_flux_target_groups():
    from t2i.models.flux import FluxTransformer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    from flux_helpers import TINY

    model = FluxTransformer(**TINY)
    attention = resolve_targets(model, ["attention"])
    assert "double_blocks.0.img_attn.qkv" in attention and "single_blocks.1.linear2" in attention
    assert not any("mlp" in t for t in attention)
    ff = resolve_targets(model, ["ff"])
    assert ff == sorted(f"double_blocks.{i}.{s}_mlp.{j}" for i in range(2) for s in ("img", "txt") for j in (0, 2))
