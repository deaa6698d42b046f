"""LoRA files and inference: diffusers `load_lora_weights` parity, kohya-ss naming, several LoRAs, fuse/unfuse.

References: diffusers' StableDiffusionPipeline (loads our file and must change the images as t2i does), and the
closed form delta W = scale * alpha / r * up @ down computed by hand from known weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lora_helpers import TOL, kohya_file, randomize_lora_b, tiny_unet, unet_output
from safetensors.torch import save_file

import t2i
from t2i.errors import LoraError
from t2i.lora import apply_lora, fuse_lora, load_lora, save_lora_file, unfuse_lora

# ------------------------------------------------------------------------------------------ diffusers parity


@pytest.mark.parametrize("targets", [None, ["attention", "ff", "conv"]], ids=["attention", "attention-ff-conv"])
def test_t2i_lora_file_changes_diffusers_images_as_it_changes_ours(sd1_lora_dir, tmp_path, targets):
    from sd_helpers import diffusers_images, initial_latents, load_diffusers, t2i_images

    trained = t2i.load_pipeline(sd1_lora_dir)
    torch.manual_seed(3)
    # alpha != rank: the file must fold alpha / r; `conv` adds 3x3 ResBlock convolutions (LoCon-style)
    adapted = apply_lora(trained.unet, rank=4, alpha=8.0, target_modules=targets)
    if targets is not None:
        assert any(p.endswith("in_layers.2") for p in adapted) and any(p.endswith("emb_layers.1") for p in adapted)
    apply_lora(trained.text_encoder.model, rank=2, alpha=2.0)
    randomize_lora_b(trained.unet, seed=4, std=0.3)
    randomize_lora_b(trained.text_encoder.model, seed=5, std=0.3)
    path = save_lora_file(trained, tmp_path / "style.safetensors")

    prompts, latents = ["a red circle"], initial_latents(1)
    pipe = t2i.load_pipeline(sd1_lora_dir)
    base = t2i_images(pipe, prompts, latents.clone(), guidance_scale=5.0)
    assert load_lora(pipe, path) == "style"
    ours = t2i_images(pipe, prompts, latents.clone(), guidance_scale=5.0)

    reference, _ = load_diffusers(sd1_lora_dir)
    reference.load_lora_weights(str(path), adapter_name="style")
    try:
        theirs = diffusers_images(sd1_lora_dir, None, prompts, latents.clone(), guidance_scale=5.0)
    finally:
        reference.unload_lora_weights()
    assert np.abs(ours - base).max() > 20 / 255, "the LoRA should visibly change the image"
    assert np.abs(ours - theirs).max() <= TOL


# ------------------------------------------------------------------------------------------ kohya-ss, scales


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_kohya_file_gives_scale_alpha_over_rank_up_down(tmp_path, scale):
    rank, alpha = 4, 2.0
    weights = kohya_file(tmp_path / "k.safetensors", seed=0, rank=rank, alpha=alpha)
    unet = tiny_unet()
    originals = {p: unet.get_submodule(p).weight.detach().clone() for p in weights}
    load_lora(unet, tmp_path / "k.safetensors", scale=scale)
    x = torch.randn(3, 7, next(iter(originals.values())).shape[1])
    for path, (down, up) in weights.items():
        layer = unet.get_submodule(path)
        bias = layer.get_base_layer().bias
        expected_w = originals[path] + scale * alpha / rank * up @ down
        x = torch.randn(3, 7, expected_w.shape[1])
        torch.testing.assert_close(layer(x), F.linear(x, expected_w, bias), rtol=1e-4, atol=1e-4)


def test_peft_and_kohya_files_written_by_t2i_load_back_to_the_same_model(tmp_path):
    source = tiny_unet()
    apply_lora(source, rank=3, alpha=6.0, target_modules=["attention", "ff", "conv"])
    randomize_lora_b(source, seed=2)
    expected = unet_output(source)
    for naming in ("peft", "kohya"):
        path = save_lora_file(source, tmp_path / f"{naming}.safetensors", naming=naming)
        target = tiny_unet()
        load_lora(target, path)
        torch.testing.assert_close(unet_output(target), expected, rtol=1e-5, atol=1e-5)


def test_several_loras_add_up_with_their_own_scales(tmp_path):
    first = kohya_file(tmp_path / "a.safetensors", seed=0, rank=4, alpha=4.0)
    second = kohya_file(tmp_path / "b.safetensors", seed=1, rank=2, alpha=1.0)
    unet = tiny_unet()
    originals = {p: unet.get_submodule(p).weight.detach().clone() for p in first}
    assert load_lora(unet, tmp_path / "a.safetensors", scale=0.5) == "a"
    assert load_lora(unet, tmp_path / "b.safetensors", scale=-1.5, name="second") == "second"
    for path in first:
        (d1, u1), (d2, u2) = first[path], second[path]
        expected_w = originals[path] + 0.5 * 1.0 * u1 @ d1 - 1.5 * 0.5 * u2 @ d2
        layer = unet.get_submodule(path)
        x = torch.randn(2, 5, expected_w.shape[1])
        torch.testing.assert_close(
            layer(x), F.linear(x, expected_w, layer.get_base_layer().bias), rtol=1e-4, atol=1e-4
        )


def test_fuse_matches_unfused_and_unfuse_restores_base_weights_bit_exactly(tmp_path):
    source = tiny_unet(seed=5)
    apply_lora(source, rank=4, alpha=4.0, target_modules=["attention", "conv"])  # 3x3 convs fuse too
    randomize_lora_b(source, seed=6)
    save_lora_file(source, tmp_path / "one.safetensors")
    kohya_file(tmp_path / "two.safetensors", seed=3, rank=2, alpha=2.0)

    unet = tiny_unet()
    base_output = unet_output(unet)
    load_lora(unet, tmp_path / "one.safetensors", scale=0.8)
    load_lora(unet, tmp_path / "two.safetensors", scale=0.3)
    before = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    lora_output = unet_output(unet)
    assert (lora_output - base_output).abs().max() > 1e-2

    assert fuse_lora(unet) > 0
    torch.testing.assert_close(unet_output(unet), lora_output, rtol=1e-4, atol=1e-5)
    assert unfuse_lora(unet) > 0
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(unet_output(unet), lora_output)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("unet.down_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight", (2, 32)),
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn9_to_q.lora_down.weight", (2, 64)),
        ("some.unrelated.tensor", (3,)),
    ],
)
def test_unknown_or_unmatched_keys_raise_lora_error_naming_them(tmp_path, key, shape):
    state = {key: torch.zeros(shape)}
    if key.endswith("lora_A.weight"):
        state[key.replace("lora_A", "lora_B")] = torch.zeros(32, 2)
    if key.endswith("lora_down.weight"):
        state[key.replace("lora_down", "lora_up")] = torch.zeros(64, 2)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraError) as info:
        load_lora(tiny_unet(), tmp_path / "bad.safetensors")
    module = key.removesuffix(".lora_A.weight").removesuffix(".lora_down.weight")
    assert module in str(info.value)
