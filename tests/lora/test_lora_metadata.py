"""LoRA files as diffusers writes them: alpha, rank_pattern and alpha_pattern in the `lora_adapter_metadata`
header, rsLoRA, `.lora.down/.lora.up` keys and DoRA magnitudes; and t2i's files read back by diffusers.

Reference: diffusers' StableDiffusionPipeline on the same random weights. The files are made the way diffusers'
training scripts make them: peft adapters added to the diffusers UNet/text encoder, then
`save_lora_weights(..., unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lora_helpers import TOL
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import t2i
from t2i.errors import LoraError
from t2i.lora import apply_lora, load_lora, save_lora_file
from t2i.lora.metadata import module_factor, pattern_value

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
PROMPTS = ["a red circle"]


def randomize_adapters(model: torch.nn.Module, seed: int) -> None:
    """peft starts lora_B at zero and DoRA magnitudes at ||W||: random values make the adapter matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.5 * torch.rand(param.shape, generator=gen))


def diffusers_lora_file(folder, out_dir, unet_config, text_config=None, seed: int = 0):
    """A LoRA file written by diffusers' own saving utilities, with its adapter metadata."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(unet_config)
    randomize_adapters(pipe.unet, seed + 1)
    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
              "unet_lora_adapter_metadata": pipe.unet.peft_config["default"].to_dict()}  # fmt: skip
    if text_config is not None:  # what `text_encoder.add_adapter` does (transformers 5 wants a newer peft for it)
        inject_adapter_in_model(text_config, pipe.text_encoder)
        randomize_adapters(pipe.text_encoder, seed + 2)
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(pipe.text_encoder)
        )
        layers["text_encoder_lora_adapter_metadata"] = pipe.text_encoder.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(str(out_dir), **layers)
    return out_dir / "pytorch_lora_weights.safetensors"


def diffusers_images_with(folder, path, latents) -> np.ndarray:
    from sd_helpers import diffusers_images, load_diffusers

    reference, _ = load_diffusers(folder)
    reference.load_lora_weights(str(path), adapter_name="x")
    try:
        return diffusers_images(folder, None, PROMPTS, latents.clone(), guidance_scale=5.0)
    finally:
        reference.unload_lora_weights()


def t2i_images_with(folder, path, latents) -> tuple[np.ndarray, np.ndarray]:
    """(base images, images with the LoRA) from t2i."""
    from sd_helpers import t2i_images

    pipe = t2i.load_pipeline(folder)
    base = t2i_images(pipe, PROMPTS, latents.clone(), guidance_scale=5.0)
    load_lora(pipe, path)
    return base, t2i_images(pipe, PROMPTS, latents.clone(), guidance_scale=5.0)


def without_header(path, out):
    """The same tensors with no header: what t2i read before, alpha taken as r."""
    save_file(load_file(str(path)), str(out))
    return out


# diffusers writes attention keys as `.lora.down/.up` but other modules' as `lora_A/_B`, and on loading converts
# only when the first key is not `lora_A`: a file with both kinds loses its attention weights in diffusers (t2i
# reads them). So each diffusers-written file here targets one kind of module.
HEADER_CASES = {
    "attention-rslora-text": (
        {"r": 4, "lora_alpha": 8, "target_modules": ATTENTION, "rank_pattern": {"attn2.to_k": 2},
         "alpha_pattern": {"to_v": 2.0, "attn2.to_k": 6.0}},
        {"r": 2, "lora_alpha": 4, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]},
    ),
    "conv": (
        {"r": 4, "lora_alpha": 2, "target_modules": ["proj_in", "conv1", "conv2"], "rank_pattern": {"conv1": 3},
         "alpha_pattern": {"conv2": 16.0}},
        None,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_alpha_and_patterns_from_the_diffusers_header_give_diffusers_images(sd1_lora_dir, tmp_path, case):
    from peft import LoraConfig
    from sd_helpers import initial_latents

    unet_kwargs, text_kwargs = HEADER_CASES[case]
    text_config = None if text_kwargs is None else LoraConfig(**text_kwargs)
    path = diffusers_lora_file(sd1_lora_dir, tmp_path / "d", LoraConfig(**unet_kwargs), text_config)
    with safe_open(str(path), "pt") as handle:
        header = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert header["unet.lora_alpha"] == unet_kwargs["lora_alpha"] and header["unet.rank_pattern"]

    latents = initial_latents(1)
    base, ours = t2i_images_with(sd1_lora_dir, path, latents)
    theirs = diffusers_images_with(sd1_lora_dir, path, latents)
    _, ignored = t2i_images_with(sd1_lora_dir, without_header(path, tmp_path / "bare.safetensors"), latents)
    print(f"{case}: LoRA effect {np.abs(ours - base).max():.3f}, t2i vs diffusers {np.abs(ours - theirs).max():.2e}, "
          f"header ignored {np.abs(ignored - theirs).max():.3f}")  # fmt: skip
    assert np.abs(ours - base).max() > 20 / 255, "the LoRA should visibly change the image"
    assert np.abs(ours - theirs).max() <= TOL
    assert np.abs(ignored - theirs).max() > 5 * TOL, "the header must matter for this file"


def test_t2i_rewrites_a_patterned_lora_so_that_diffusers_reads_it_back(sd1_lora_dir, tmp_path):
    """diffusers' file (mixed ranks and alphas) -> t2i -> save_lora_file -> diffusers: the same images."""
    from peft import LoraConfig
    from sd_helpers import initial_latents

    config = LoraConfig(r=4, lora_alpha=2, target_modules=ATTENTION, rank_pattern={"attn1.to_q": 2},
                        alpha_pattern={"attn2.to_out.0": 12.0})  # fmt: skip
    original = diffusers_lora_file(sd1_lora_dir, tmp_path / "d", config, seed=3)
    pipe = t2i.load_pipeline(sd1_lora_dir)
    name = load_lora(pipe, original)
    rewritten = save_lora_file(pipe, tmp_path / "t2i.safetensors", adapter_name=name)
    with safe_open(str(rewritten), "pt") as handle:
        header = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert header["unet.r"] == 4 and set(header["unet.rank_pattern"].values()) == {2}

    latents = initial_latents(1)
    expected = diffusers_images_with(sd1_lora_dir, original, latents)
    assert np.abs(diffusers_images_with(sd1_lora_dir, rewritten, latents) - expected).max() <= TOL


@pytest.mark.parametrize("targets", [ATTENTION, ["proj_in", "conv1", "conv2"]], ids=["linear", "conv"])
def test_diffusers_dora_file_gives_diffusers_images(sd1_lora_dir, tmp_path, targets):
    from peft import LoraConfig
    from sd_helpers import initial_latents

    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=targets)
    path = diffusers_lora_file(sd1_lora_dir, tmp_path / "d", config, seed=5)
    assert any(k.endswith(".lora_magnitude_vector") for k in load_file(str(path)))
    latents = initial_latents(1)
    base, ours = t2i_images_with(sd1_lora_dir, path, latents)
    theirs = diffusers_images_with(sd1_lora_dir, path, latents)
    assert np.abs(ours - base).max() > 10 / 255
    assert np.abs(ours - theirs).max() <= TOL


def test_t2i_dora_file_is_read_by_diffusers(sd1_lora_dir, tmp_path):
    from sd_helpers import initial_latents, t2i_images

    trained = t2i.load_pipeline(sd1_lora_dir)
    torch.manual_seed(2)
    apply_lora(trained.unet, rank=4, alpha=8.0, target_modules=["attention", "conv"], dora=True)
    randomize_adapters(trained.unet, seed=7)
    path = save_lora_file(trained, tmp_path / "dora.safetensors")
    keys = load_file(str(path))
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)

    latents = initial_latents(1)
    ours = t2i_images(trained, PROMPTS, latents.clone(), guidance_scale=5.0)
    _, reloaded = t2i_images_with(sd1_lora_dir, path, latents)
    theirs = diffusers_images_with(sd1_lora_dir, path, latents)
    assert np.abs(reloaded - ours).max() <= 1e-5
    assert np.abs(ours - theirs).max() <= TOL


# ------------------------------------------------------------------------------------------ header semantics


@pytest.mark.parametrize(
    "name", ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "mid_block.attentions.0.proj_in",
             "up_blocks.0.resnets.1.conv1", "x.attn2.to_kk", "to_v"],
)  # fmt: skip
def test_pattern_lookup_matches_peft(name):
    from peft.utils.other import get_pattern_key

    patterns = {"attn2.to_k": 2, "proj_in": 3, r"up_blocks\.0.*conv1": 5, "to_v": 7}
    key = get_pattern_key(patterns.keys(), name)
    assert pattern_value(patterns, name, None) == patterns.get(key)


def test_rslora_factor_is_alpha_over_sqrt_r():
    config = {"r": 4, "lora_alpha": 6, "use_rslora": True, "rank_pattern": {"to_k": 9}}
    assert module_factor(config, "a.to_q") == (4, 3.0)
    assert module_factor(config, "a.to_k") == (9, 2.0)


def test_header_rank_that_disagrees_with_the_weights_is_an_error(tmp_path):
    from lora_helpers import tiny_unet

    unet = tiny_unet()
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    state = {f"unet.{name}.lora_A.weight": torch.zeros(2, 16), f"unet.{name}.lora_B.weight": torch.zeros(64, 2)}
    header = {"unet.r": 4, "unet.lora_alpha": 8}
    save_file(state, str(tmp_path / "bad.safetensors"), metadata={"lora_adapter_metadata": json.dumps(header)})
    with pytest.raises(LoraError, match=f"unet.{name} has rank 2 but its lora_adapter_metadata says r=4"):
        load_lora(unet, tmp_path / "bad.safetensors")


def test_dora_fuses_and_unfuses_on_linear_and_conv_layers(tmp_path):
    from lora_helpers import tiny_unet, unet_output

    from t2i.lora import fuse_lora, unfuse_lora

    source = tiny_unet()
    torch.manual_seed(4)
    apply_lora(source, rank=3, alpha=6.0, target_modules=["attention", "conv"], dora=True)
    randomize_adapters(source, seed=8)
    path = save_lora_file(source, tmp_path / "dora.safetensors")
    unet = tiny_unet()
    base = unet_output(unet)
    load_lora(unet, path, scale=0.7)
    load_lora(unet, path, scale=0.4, name="again")  # two DoRAs on every module
    output = unet_output(unet)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    assert (output - base).abs().max() > 1e-2
    fuse_lora(unet)
    torch.testing.assert_close(unet_output(unet), output, rtol=1e-4, atol=1e-5)
    unfuse_lora(unet)
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in state.items())
