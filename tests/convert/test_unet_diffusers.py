"""Parity of t2i UNetModel with diffusers UNet2DConditionModel (the reference) through the converter.

Tiny random diffusers UNets are saved with `save_pretrained`, loaded by t2i, and run on the same inputs; the
reverse direction writes t2i weights in diffusers format and loads them with diffusers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from t2i.convert.unet_diffusers import (
    diffusers_to_unet_config,
    load_unet_from_diffusers,
    save_unet_as_diffusers,
    t2i_to_diffusers_state_dict,
    unet_config_to_diffusers,
)
from t2i.errors import ConfigError, PipelineLoadError, WeightsMismatchError
from t2i.models.unet import UNetModel

diffusers = pytest.importorskip("diffusers")
UNet2DConditionModel = diffusers.UNet2DConditionModel

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "sd"
CONTEXT_DIM = 24

# SD1 style: conv proj_in/out, attention_head_dim = number of heads; deepest level without attention.
SD1_STYLE = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
# SD2 style: linear projections, per-level head counts with a constant head width of 16, depth 2,
# first level without attention.
SD2_STYLE = {
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 2,
    "attention_head_dim": [2, 4, 4],
    "use_linear_projection": True,
    "transformer_layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}
# Attention at the outer levels only (skips the middle one), SD1 projections, 2 res blocks.
SKIP_MIDDLE = {
    "block_out_channels": (32, 32, 64),
    "layers_per_block": 2,
    "attention_head_dim": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
}
CASES = {"sd1_style": SD1_STYLE, "sd2_style": SD2_STYLE, "skip_middle": SKIP_MIDDLE}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: zero-initialised output layers would otherwise hide mapping mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def tiny_diffusers_unet(kind: str, seed: int = 0) -> UNet2DConditionModel:
    model = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        cross_attention_dim=CONTEXT_DIM,
        norm_num_groups=32,
        **CASES[kind],
    )
    randomize_(model, seed)
    return model.eval()


def inputs(size: int = 16):
    g = torch.Generator().manual_seed(7)
    return (
        torch.randn(2, 4, size, size, generator=g),
        torch.tensor([1.0, 871.0]),
        torch.randn(2, 6, CONTEXT_DIM, generator=g),
    )


@pytest.fixture(scope="module", params=list(CASES))
def saved_reference(request, tmp_path_factory):
    ref = tiny_diffusers_unet(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


@pytest.mark.parametrize("use_flash_attention", [True, False])
def test_diffusers_folder_loads_and_matches_reference(saved_reference, use_flash_attention):
    ref, folder = saved_reference
    ours = load_unet_from_diffusers(folder, use_flash_attention=use_flash_attention)
    assert ours.unet_config["use_flash_attention"] is use_flash_attention
    x, t, ctx = inputs()
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, ctx, None)
    assert (got - expected).abs().max().item() < 1e-4


def test_t2i_weights_export_to_diffusers_and_match(saved_reference, tmp_path):
    _ref, folder = saved_reference
    ours = load_unet_from_diffusers(folder)
    randomize_(ours, seed=3)  # fresh weights so the round trip cannot pass by returning the originals
    x, t, ctx = inputs()
    out = save_unet_as_diffusers(ours, tmp_path / "unet")
    theirs = UNet2DConditionModel.from_pretrained(out).eval()
    rebuilt = UNet2DConditionModel(**unet_config_to_diffusers(ours.unet_config)).eval()
    rebuilt.load_state_dict(t2i_to_diffusers_state_dict(ours.state_dict(), ours.unet_config), strict=True)
    with torch.no_grad():
        expected = ours(x, t, ctx)
        for model in (theirs, rebuilt):
            assert (model(x, t, encoder_hidden_states=ctx).sample - expected).abs().max().item() < 1e-4


def diffusers_sd_config(name: str) -> dict:
    """The published SD 1.5 / SD 2.x unet/config.json fields that matter (facts from the model cards)."""
    common = {
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "center_input_sample": False,
    }
    if name == "sd15":
        return {**common, "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64}
    return {
        **common,
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024,
        "sample_size": 96,
        "use_linear_projection": True,
        "upcast_attention": True,
    }


@pytest.mark.parametrize(("diffusers_name", "yaml_name"), [("sd15", "sd15"), ("sd2", "sd21-v")])
def test_published_sd_configs_map_to_our_yaml(diffusers_name, yaml_name):
    ours = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{yaml_name}.yaml").model.unet_config)
    converted = diffusers_to_unet_config(diffusers_sd_config(diffusers_name))
    arch_keys = set(ours) - {"use_checkpoint", "image_size"}
    assert {k: converted[k] for k in arch_keys} == {k: ours[k] for k in arch_keys}
    back = unet_config_to_diffusers(ours)
    assert back["attention_head_dim"] == diffusers_sd_config(diffusers_name)["attention_head_dim"]
    assert back["down_block_types"] == diffusers_sd_config(diffusers_name)["down_block_types"]


def test_unsupported_diffusers_config_is_a_config_error():
    with pytest.raises(ConfigError, match="resnet_time_scale_shift"):
        diffusers_to_unet_config({**diffusers_sd_config("sd15"), "resnet_time_scale_shift": "scale_shift"})
    with pytest.raises(ConfigError, match="up_block_types"):
        diffusers_to_unet_config(
            {**diffusers_sd_config("sd15"), "up_block_types": ["CrossAttnUpBlock2D"] * 4}
        )


def test_mismatched_weights_and_missing_folder_are_errors(saved_reference, tmp_path):
    _, folder = saved_reference
    with pytest.raises(PipelineLoadError, match="config.json"):
        load_unet_from_diffusers(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config["layers_per_block"] = config["layers_per_block"] + 1
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    with pytest.raises(WeightsMismatchError, match="missing"):
        load_unet_from_diffusers(bad)


def test_pipeline_folder_finds_its_unet(saved_reference, tmp_path):
    ref, folder = saved_reference
    (tmp_path / "unet").mkdir()
    for f in folder.iterdir():
        (tmp_path / "unet" / f.name).write_bytes(f.read_bytes())
    ours = load_unet_from_diffusers(tmp_path)
    assert isinstance(ours, UNetModel)
    assert torch.equal(ours.state_dict()["input_blocks.0.0.weight"], ref.state_dict()["conv_in.weight"])


@pytest.mark.gpu
def test_bf16_cuda_matches_float32_reference(saved_reference):
    """On a GPU in bf16 (SDPA flash/mem-efficient kernels), t2i stays close to diffusers in float32."""
    ref, folder = saved_reference
    ours = load_unet_from_diffusers(folder, dtype=torch.bfloat16).cuda()
    x, t, ctx = inputs()
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=ctx).sample
        got = ours(x.cuda(), t.cuda(), ctx.cuda()).float().cpu()
    assert got.dtype == torch.float32
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel.item() < 5e-2
