"""Loading the three forms (diffusers folder, single file, t2i folder), saving, builders, img2img.

The reference is diffusers (StableDiffusionPipeline / StableDiffusionImg2ImgPipeline on the same weights).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sd_helpers import SIZE, diffusers_images, initial_latents, load_diffusers, t2i_images

import t2i
from t2i.pipelines.build import build_components, build_unet, build_vae, count_parameters

TOL = 2 / 255


@pytest.fixture(scope="module", autouse=True)
def _quiet_loaders():
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="module")
def sd1(sd1_dir):
    return t2i.load_pipeline(sd1_dir)


def test_diffusers_folder_components_and_derived_config(sd1, sd2_dir):
    from t2i.models.autoencoder import AutoencoderKL
    from t2i.models.unet import UNetModel

    assert isinstance(sd1.unet, UNetModel) and isinstance(sd1.vae, AutoencoderKL)
    assert sd1.text_encoder.kind == "clip" and sd1.text_encoder.max_length == 16
    assert sd1.scheduler_config["_class_name"] == "PNDMScheduler"
    assert sd1.model_config["parameterization"] == "eps"
    sd2 = t2i.load_pipeline(sd2_dir, dtype=torch.float64)
    assert sd2.dtype == torch.float64 and sd2.prediction == "v"
    assert sd2.model_config["parameterization"] == "v"
    assert sd2.model_config["unet_config"]["use_linear_in_transformer"] is True


def test_saved_folder_layout(tmp_path, sd1):
    from t2i.config import load_config

    root = sd1.save_pretrained(tmp_path / "out")
    index = json.loads((root / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    cfg = load_config(root / "t2i.yaml")
    assert cfg.model.cond_stage_config.kind == "clip" and cfg.model.cond_stage_config.max_length == 16
    assert cfg.model.unet_config.model_kwargs() | {"use_checkpoint": False} == sd1.unet.unet_config | {
        "use_checkpoint": False
    }
    vae_config = json.loads((root / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == pytest.approx(sd1.scale_factor)


def randomize_zero_params(*modules: torch.nn.Module) -> None:
    """CompVis zero-initialises output convs and attention proj_out; make them random so text reaches pixels."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                if not p.any():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


TINY_MINILM_MODEL = {
    "kind": "latent_diffusion",
    "unet_config": {
        "model_channels": 32,
        "channel_mult": [1, 2],
        "attention_resolutions": [2],
        "num_res_blocks": 1,
        "num_heads": 4,
        "context_dim": 384,
        "use_checkpoint": False,
        "image_size": SIZE // 2,
    },
    "first_stage_config": {
        "embed_dim": 4,
        "ddconfig": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "resolution": SIZE},
    },
    "cond_stage_config": {"kind": "minilm", "max_length": 12},
}


def test_minilm_pipeline_saved_for_diffusers_matches(tmp_path):
    """A t2i-built pipeline with the MiniLM (BERT) encoder: diffusers must mask the encoder and pad to 12."""
    from t2i.pipelines.loading import assemble_pipeline

    components = build_components(TINY_MINILM_MODEL)
    randomize_zero_params(components["unet"])
    pipe = assemble_pipeline(TINY_MINILM_MODEL, **components)
    assert pipe.default_sampler == "ddim" and pipe.scheduler_config["steps_offset"] == 1
    root = pipe.save_pretrained(tmp_path / "minilm")
    assert json.loads((root / "text_encoder" / "config.json").read_text())["use_attention_mask"] is True
    latents = initial_latents(2, seed=2)
    prompts = ["a red circle", "a blue square on the left"]
    ref = diffusers_images(root, None, prompts, latents.clone())
    ours = t2i_images(pipe, prompts, latents.clone())
    assert np.abs(ours - ref).max() <= TOL
    assert np.abs(ours[0] - ours[1]).max() > 10 * TOL
    reloaded = t2i.load_pipeline(root)
    assert reloaded.text_encoder.kind == "minilm" and reloaded.text_encoder.max_length == 12
    assert np.abs(t2i_images(reloaded, prompts, latents.clone()) - ours).max() <= 1e-5


def sd2_single_file(folder, path, nemo: bool) -> None:
    """An SD2-style single file: CompVis UNet/VAE keys and an OpenCLIP text tower (`cond_stage_model.model.*`)."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from t2i.convert.text_keys import hf_to_sd2_text
    from t2i.convert.unet_diffusers import diffusers_to_t2i_state_dict, diffusers_to_unet_config
    from t2i.convert.vae_diffusers import state_dict_from_diffusers

    unet_config = diffusers_to_unet_config(json.loads((folder / "unet" / "config.json").read_text()))
    unet = diffusers_to_t2i_state_dict(
        load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"), unet_config
    )
    vae = state_dict_from_diffusers(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    hf_text = CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict()
    text = hf_to_sd2_text({"text_model." + k.removeprefix("text_model."): v for k, v in hf_text.items()})
    prefix = "model." if nemo else ""
    state = {
        **{f"{prefix}model.diffusion_model.{k}": v for k, v in unet.items()},
        **{f"{prefix}first_stage_model.{k}": v for k, v in vae.items()},
        **{prefix + k: v for k, v in text.items()},
        "betas": torch.ones(1000),
    }
    torch.save({"state_dict": state}, path)
    return unet_config


def sd2_yaml(folder, unet_config, path, layer: str = "last") -> None:
    from omegaconf import OmegaConf

    from t2i.convert.vae_diffusers import config_from_diffusers

    vae = config_from_diffusers(json.loads((folder / "vae" / "config.json").read_text()))
    model = {
        "kind": "latent_diffusion",
        "parameterization": "v",
        "scale_factor": vae["scale_factor"],
        "unet_config": unet_config,
        "first_stage_config": {"embed_dim": 4, "ddconfig": vae["ddconfig"]},
        "cond_stage_config": {"kind": "openclip", "path": str(folder), "max_length": 16, "layer": layer},
    }
    OmegaConf.save(OmegaConf.create({"model": model}), path)


@pytest.mark.parametrize("nemo", [False, True])
def test_sd2_openclip_ckpt_matches_diffusers(tmp_path, sd2_dir, nemo):
    unet_config = sd2_single_file(sd2_dir, tmp_path / "sd2.ckpt", nemo)
    sd2_yaml(sd2_dir, unet_config, tmp_path / "sd2.yaml")
    pipe = t2i.load_pipeline(tmp_path / "sd2.ckpt", config=str(tmp_path / "sd2.yaml"))
    assert pipe.text_encoder.kind == "openclip" and pipe.prediction == "v"
    latents = initial_latents(1, seed=4)
    # Single files get SD's DDIM schedule (leading, steps_offset 1).
    ddim = ("DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 1})
    ref = diffusers_images(sd2_dir, ddim, "a red circle", latents.clone())
    assert np.abs(t2i_images(pipe, "a red circle", latents.clone()) - ref).max() <= TOL
    if not nemo:
        saved = pipe.save_pretrained(tmp_path / "export")
        assert np.abs(diffusers_images(saved, None, "a red circle", latents.clone()) - ref).max() <= TOL


def test_penultimate_layer_is_saved_as_a_truncated_encoder(tmp_path, sd2_dir):
    unet_config = sd2_single_file(sd2_dir, tmp_path / "sd2.ckpt", nemo=False)
    sd2_yaml(sd2_dir, unet_config, tmp_path / "sd2.yaml", layer="penultimate")
    pipe = t2i.load_pipeline(tmp_path / "sd2.ckpt", config=str(tmp_path / "sd2.yaml"))
    saved = t2i.load_pipeline(pipe.save_pretrained(tmp_path / "export"))
    assert saved.text_encoder.layer == "last"
    assert (
        saved.text_encoder.model.config.num_hidden_layers
        == pipe.text_encoder.model.config.num_hidden_layers - 1
    )
    prompts = ["a red circle", ""]
    torch.testing.assert_close(
        saved.text_encoder.encode(prompts).embeddings, pipe.text_encoder.encode(prompts).embeddings
    )


def test_img2img_matches_diffusers(sd1_dir, sd1):
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    base, scheduler = load_diffusers(sd1_dir)
    ref_pipe = StableDiffusionImg2ImgPipeline(
        **{**base.components, "scheduler": DDIMScheduler.from_config(scheduler.config)}
    )
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(
        "a red circle",
        image=image,
        strength=0.5,
        num_inference_steps=4,
        output_type="np",
        generator=torch.Generator().manual_seed(9),
    ).images
    out = sd1.reconstruct(
        "a red circle", image, strength=0.5, steps=4, sampler="ddim", seed=9, progress=False
    )
    ours = out.pixels.permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - ref).max() <= TOL
    full = sd1.reconstruct(
        "a red circle", image, strength=1.0, steps=4, sampler="ddim", seed=9, progress=False
    )
    assert np.abs(full.pixels - out.pixels).max() > 10 * TOL


def test_builders_on_meta_count_sd15():
    assert count_parameters(build_unet("sd15", device="meta")) == 859_520_964
    assert count_parameters(build_vae("sd15", device="meta")) == 83_653_863
    parts = build_components({"model": {"cond_stage_config": {"kind": "minilm"}}}, device="meta")
    assert next(parts["unet"].parameters()).is_meta
    assert count_parameters(parts["text_encoder"]) == 22_713_216


def test_pipeline_to_moves_and_casts(sd1_dir):
    pipe = t2i.load_pipeline(sd1_dir).to("cpu", torch.float64)
    assert pipe.dtype == torch.float64 and next(pipe.vae.parameters()).dtype == torch.float64
    assert pipe.device == torch.device("cpu")


@pytest.mark.gpu
def test_half_precision_on_cuda_is_close_to_float32(sd1_dir):
    pipe = t2i.load_pipeline(sd1_dir, device="cuda")
    latents = initial_latents(1, seed=6)
    full = t2i_images(pipe, "a red circle", latents.clone())
    half = t2i_images(pipe.to("cuda", torch.float16), "a red circle", latents.clone())
    assert np.abs(full - half).max() < 0.05
