"""SDXL LoRA files: t2i's LoRAs (UNet, text_encoder, text_encoder_2) load in diffusers' StableDiffusionXLPipeline
and change its images exactly as they change t2i's, in diffusers/PEFT and in kohya-ss naming; kohya files with
sgm UNet paths (`lora_unet_input_blocks_4_1_...`, what sd-scripts writes for SDXL) or diffusers paths, and
`lora_te1_` / `lora_te2_` keys, land on the right modules (delta W = scale * alpha / r * up @ down)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sd_helpers import SIZE, initial_latents
from sdxl_helpers import tiny_sdxl_pipeline
from test_lora_files import randomize_lora_b

import t2i
from t2i.lora import apply_lora, load_lora, save_lora_file

TOL = 1e-5


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    folder = tmp_path_factory.mktemp("sdxl_lora_base")
    tiny_sdxl_pipeline().save_pretrained(folder)
    return folder


def generate(pipe, seed: int = 0) -> np.ndarray:
    call = {"prompt": ["a red circle"], "negative_prompt": ["red"], "latents": initial_latents(1, seed=seed),
            "height": SIZE, "width": SIZE, "guidance_scale": 5.0}  # fmt: skip
    if isinstance(pipe, t2i.pipelines.latent.LatentPipeline):
        return pipe.generate(**call, steps=3, sampler="euler", progress=False).pixels.permute(0, 2, 3, 1).numpy()
    return pipe(**call, num_inference_steps=3, output_type="np").images


@pytest.mark.parametrize(
    ("naming", "targets"),
    [("peft", None), ("peft", ["attention", "ff", "conv"]), ("kohya", ["attention", "ff", "conv"])],
    ids=["peft-attention", "peft-attention-ff-conv", "kohya-attention-ff-conv"],
)
def test_t2i_sdxl_lora_changes_diffusers_images_as_it_changes_ours(sdxl_dir, tmp_path, naming, targets):
    import diffusers

    trained = t2i.load_pipeline(sdxl_dir)
    torch.manual_seed(3)
    apply_lora(trained.unet, rank=4, alpha=8.0, target_modules=targets)  # alpha != rank: alpha / r is folded
    apply_lora(trained.text_encoder.model, rank=2, alpha=2.0)
    apply_lora(trained.text_encoder_2.model, rank=2, alpha=4.0)
    for i, module in enumerate((trained.unet, trained.text_encoder.model, trained.text_encoder_2.model)):
        randomize_lora_b(module, seed=4 + i, std=0.3)
    path = save_lora_file(trained, tmp_path / "style.safetensors", naming=naming)
    keys = list(load_file(str(path)))
    if naming == "kohya":
        assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}
        assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # sgm paths, as sd-scripts writes
        assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in keys)
    else:
        assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
        assert any(k.startswith("text_encoder_2.text_model.encoder.layers.") for k in keys)

    pipe = t2i.load_pipeline(sdxl_dir)
    base = generate(pipe)
    load_lora(pipe, path)
    ours = generate(pipe)
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir), add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(path), adapter_name="style")
    theirs = generate(reference)
    assert np.abs(ours - base).max() > 0.05, "the LoRA should visibly change the image"
    assert np.abs(ours - theirs).max() <= TOL

    # every part matters: without the text encoders' adapters the image is another one
    pipe.unload_lora()
    load_lora(pipe, save_lora_file({"unet": trained.unet}, tmp_path / "unet_only.safetensors", naming=naming))
    assert np.abs(generate(pipe) - ours).max() > 1e-3


SGM_MODULES = {  # our path: the flat kohya name sd-scripts writes for SDXL (in the tiny UNet's numbering)
    "input_blocks.3.1.transformer_blocks.0.attn1.to_q": "input_blocks_3_1_transformer_blocks_0_attn1_to_q",
    "middle_block.1.transformer_blocks.1.ff.net.2": "middle_block_1_transformer_blocks_1_ff_net_2",
}


@pytest.mark.parametrize("spelling", ["sgm", "diffusers"])
def test_kohya_sdxl_file_lands_on_unet_and_both_text_encoders(sdxl_dir, tmp_path, spelling):
    from t2i.lora.files import sd_unet_module_names

    pipe = t2i.load_pipeline(sdxl_dir)
    diffusers_names = sd_unet_module_names(pipe.unet.unet_config)
    rank, alpha, scale = 2, 3.0, 0.5
    gen = torch.Generator().manual_seed(0)
    state, expected = {}, {}
    targets = {("unet", p): "lora_unet_" + (flat if spelling == "sgm" else diffusers_names[p].replace(".", "_"))
               for p, flat in SGM_MODULES.items()}  # fmt: skip
    targets[("text_encoder", "encoder.layers.1.self_attn.q_proj")] = "lora_te1_text_model_encoder_layers_1_self_attn_q_proj"
    targets[("text_encoder_2", "encoder.layers.0.mlp.fc1")] = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder.model, "text_encoder_2": pipe.text_encoder_2.model}
    for (component, path), flat in targets.items():
        weight = modules[component].get_submodule(path).weight
        down, up = torch.randn(rank, weight.shape[1], generator=gen), torch.randn(weight.shape[0], rank, generator=gen)
        state |= {f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up, f"{flat}.alpha": torch.tensor(alpha)}
        expected[(component, path)] = (weight.detach().clone() + scale * alpha / rank * up @ down, down.shape[1])
    save_file(state, str(tmp_path / "kohya.safetensors"))
    load_lora(pipe, tmp_path / "kohya.safetensors", scale=scale)
    for (component, path), (weight, width) in expected.items():
        layer = modules[component].get_submodule(path)
        x = torch.randn(3, width, generator=gen)
        torch.testing.assert_close(layer(x), F.linear(x, weight, layer.get_base_layer().bias), rtol=1e-4, atol=1e-4)
