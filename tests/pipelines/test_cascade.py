"""Cascade pipeline: per-stage sampling options, CFG against all-zero text, DPM-Solver++ on Imagen stages, dynamic
thresholding, save/load of cascade folders (t2i.load_cascade)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from t2i.config import build_config
from t2i.errors import InvalidInputError, PipelineLoadError
from t2i.pipelines.cascade import CascadePipeline, load_cascade
from t2i.pipelines.imagen_stage import ImagenStage, StageDefaults
from t2i.text.encoders import TextEncoding

DIM = 384  # MiniLM's width, so saved cascades reload with the real default encoder


class FakeEncoder(nn.Module):
    """Deterministic per-prompt embeddings (B, 5, DIM); the mask marks as many tokens as the prompt has words."""

    dim = DIM

    def encode(self, prompts: list[str]) -> TextEncoding:
        emb, mask = torch.zeros(len(prompts), 5, DIM), torch.zeros(len(prompts), 5, dtype=torch.bool)
        for i, p in enumerate(prompts):
            g = torch.Generator().manual_seed(sum(map(ord, p)))
            n = min(len(p.split()), 5)
            emb[i, :n] = torch.randn(n, DIM, generator=g)
            mask[i, :n] = True
        return TextEncoding(emb, mask, emb.mean(1))


def stage_model(unet_type: str) -> dict:
    common = {
        "embed_dim": 8,
        "text_embed_dim": DIM,
        "num_attn_heads": 1,
        "per_head_channels": 8,
        "feature_pooling_type": "mean",
        "learned_sinu_pos_emb_dim": 0,
    }
    if unet_type == "base":
        unet = common | {
            "image_size": 8,
            "num_res_blocks": 1,
            "channel_mult": [1, 2],
            "cond_dim": 8,
            "attention_resolutions": [4],
        }
        cond = {"embed_dim": DIM, "token_length": 6}
    else:
        unet = common | {
            "image_size": 16,
            "channel_mult": [1, 2],
            "atnn_enabled_at": [0, 1],
            "num_resblocks": [1, 1],
            "noise_cond_aug": True,
        }
        cond = {"embed_dim": DIM, "token_length": 6, "low_res_size": 8}
    return {
        "kind": "imagen",
        "unet_type": unet_type,
        "unet": unet,
        "preconditioning_type": "EDM",
        "conditioning": cond,
    }


def make_stage(unet_type: str, seed: int) -> ImagenStage:
    torch.manual_seed(seed)
    stage = ImagenStage(build_config({"model": stage_model(unet_type)}).model)
    with torch.no_grad():  # random (not zero-initialised) output layers, so the network matters
        for p in stage.unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return stage.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def cascade() -> CascadePipeline:
    encoder = FakeEncoder()
    defaults = [StageDefaults("heun", 3, 3.0), StageDefaults("heun", 2, 1.5, aug_level=0.002)]
    return CascadePipeline([make_stage("base", 0), make_stage("sr", 1)], defaults, [encoder, encoder])


def test_generate_returns_per_stage_intermediates(cascade):
    out = cascade.generate(["a red circle", "a blue square"], num_images=2, seed=3, return_intermediates=True)
    assert len(out.images) == 4 and out.images[0].size == (16, 16)
    assert [im.size for im in out.intermediates[0]] == [(8, 8)] * 4
    assert [im.tobytes() for im in out.intermediates[1]] == [im.tobytes() for im in out.images]
    again = cascade.generate(["a red circle", "a blue square"], num_images=2, seed=3)
    assert torch.equal(out.pixels, again.pixels)
    other = cascade.generate(["a red circle", "a blue square"], num_images=2, seed=4)
    assert not torch.equal(out.pixels, other.pixels)


def test_per_stage_options_are_checked(cascade):
    with pytest.raises(InvalidInputError, match="steps: 3 values for 2 stages"):
        cascade.generate("x", steps=[1, 2, 3])
    with pytest.raises(InvalidInputError, match="aug_level"):
        cascade.generate("x", steps=1, aug_level=[None, 0.0])


def test_one_euler_step_is_cfg_against_zero_text(cascade):
    """sampler euler with 1 step returns D_cfg(sigma_max * noise) exactly; recompute it by hand."""
    stage, prompt, scale = cascade.stages[0], "a green cross", 2.5
    out = cascade.generate(
        prompt, steps=[1, 1], sampler="euler", guidance_scale=[scale, 1.0], seed=9, return_intermediates=True
    )
    g = torch.Generator().manual_seed(9)
    torch.randint(2**31, (1,), generator=g)  # the pipeline first draws the seed of the stage's sampler noise
    sigma_max = float(stage.sigmas(1)[0])
    x = torch.randn(1, 3, 8, 8, generator=g) * sigma_max
    text = FakeEncoder().encode([prompt])
    cond = stage.text_embedder(None).entries(text.embeddings, text.mask, stage.device)
    denoiser = stage.denoiser()
    sigma = torch.full((1,), sigma_max)
    d_cond = denoiser(x, sigma, cond)
    d_uncond = denoiser(
        x,
        sigma,
        {
            "context": torch.zeros_like(cond["context"]),
            "context_mask": torch.zeros_like(cond["context_mask"]),
        },
    )
    expected = (d_uncond + scale * (d_cond - d_uncond)).clamp(-1, 1)
    got = torch.from_numpy(np.array(out.intermediates[0][0])).float()  # (8, 8, 3) uint8 -> float
    reference = ((expected[0].permute(1, 2, 0) + 1) / 2 * 255).round()
    assert (got - reference).abs().max() <= 1


def test_dpmpp_2m_agrees_with_heun_on_the_ode(cascade):
    """Both solve the same probability-flow ODE of the Imagen stages, so with enough steps they agree."""
    common = {"guidance_scale": [2.0, 1.5], "seed": 1}
    heun = cascade.generate("a red circle", steps=[15, 15], sampler="heun", **common).pixels
    dpm = cascade.generate("a red circle", steps=[25, 25], sampler=["dpmpp_2m", "dpmpp_2m"], **common).pixels
    euler = cascade.generate("a red circle", steps=[3, 3], sampler="euler", **common).pixels
    assert torch.isfinite(dpm).all()
    assert (dpm - heun).abs().mean() < 0.02
    assert (euler - heun).abs().mean() > (dpm - heun).abs().mean()  # a rough solver is measurably worse


def test_dynamic_thresholding_changes_a_saturated_sample(cascade):
    plain = cascade.generate("a red circle", steps=[3, 2], guidance_scale=[30.0, 1.0], seed=2).pixels
    thresholded = cascade.generate(
        "a red circle", steps=[3, 2], guidance_scale=[30.0, 1.0], seed=2, dynamic_thresholding=[0.9, None]
    ).pixels
    assert not torch.equal(plain, thresholded)
    assert thresholded.min() >= 0 and thresholded.max() <= 1


def test_sr_first_stage_needs_low_res(cascade):
    sr_only = CascadePipeline(cascade.stages[1:], cascade.defaults[1:], cascade.text_encoders[1:])
    with pytest.raises(InvalidInputError, match="low_res"):
        sr_only.generate("x")
    out = sr_only.generate(["x", "y"], low_res=torch.zeros(2, 3, 8, 8), steps=2)
    assert out.images[0].size == (16, 16)


def test_save_and_load_cascade_folder(tmp_path, cascade):
    import t2i
    from t2i.cli.eval import load_model

    folder = cascade.save_pretrained(tmp_path / "cascade", names=["base", "sr"])
    assert (folder / "cascade.yaml").is_file() and (folder / "sr" / "model.safetensors").is_file()
    loaded = t2i.load_cascade(folder, device="cpu")
    assert [s.settings.unet_type for s in loaded.stages] == ["base", "sr"]
    assert loaded.text_encoders[0] is loaded.text_encoders[1]  # one MiniLM shared by both stages
    for a, b in zip(cascade.stages, loaded.stages):
        for name, value in a.unet.state_dict().items():
            assert torch.equal(value, b.unet.state_dict()[name])
    assert loaded.defaults[1].aug_level == 0.002 and loaded.defaults[0].steps == 3
    from_list = load_cascade([folder / "base", folder / "sr"], device="cpu")
    a = loaded.generate("a red circle", steps=2, seed=0).pixels
    b = from_list.generate("a red circle", steps=2, seed=0).pixels
    assert torch.equal(a, b)
    assert isinstance(load_model(str(folder)), CascadePipeline)


def test_load_errors(tmp_path):
    with pytest.raises(PipelineLoadError, match="not a cascade folder"):
        load_cascade(tmp_path)
    (tmp_path / "cascade.yaml").write_text("stages: []\n")
    with pytest.raises(PipelineLoadError, match="non-empty"):
        load_cascade(tmp_path)
    with pytest.raises(PipelineLoadError, match="not an Imagen stage folder"):
        load_cascade([tmp_path])


def test_t2i_sample_puts_a_lora_on_the_cascade_stage_it_fits(tmp_path, cascade, capsys):
    import copy

    from PIL import Image

    from t2i.cli.main import main
    from t2i.lora import apply_lora, save_lora_file
    from t2i.lora.peft_lora import lora_layers

    folder = cascade.save_pretrained(tmp_path / "cascade", names=["base", "sr"])
    unet = copy.deepcopy(cascade.stages[0].unet)
    apply_lora(unet, rank=2, alpha=2.0, target_modules=["attention", "conv"])
    with torch.no_grad():
        for _, layer in lora_layers(unet):
            layer.lora_B["default"].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    lora = save_lora_file({"unet": unet}, tmp_path / "base-lora.safetensors")

    png = tmp_path / "cli.png"
    argv = ["sample", "--model", str(folder), "--prompt", "a red circle", "--out", str(png), "--seed", "3",
            "--steps", "2", "--lora", f"{lora}:0.7"]  # fmt: skip
    assert main(argv) == 0
    expected_pipe = load_cascade(folder, device="cpu")
    plain = np.asarray(expected_pipe.generate("a red circle", steps=2, seed=3).images[0], dtype=np.int16)
    expected_pipe.load_lora(lora, scale=0.7)  # the method form
    assert expected_pipe.stages[1].unet is not None and not list(lora_layers(expected_pipe.stages[1].unet))
    expected = np.asarray(expected_pipe.generate("a red circle", steps=2, seed=3).images[0], dtype=np.int16)
    with Image.open(png) as image:
        ours = np.asarray(image, dtype=np.int16)
    assert np.abs(ours - expected).max() <= 1
    assert np.abs(ours - plain).max() > 10

    capsys.readouterr()
    assert main([*argv[:-2], "--height", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--height: not available for a cascade" in err and "\n" not in err
