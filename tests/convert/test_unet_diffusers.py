"""Parity of t2i UNetModel with diffusers UNet2DConditionModel (the reference) through the converter.

Tiny random diffusers UNets are saved with `save_pretrained`, loaded by t2i, and run on the same inputs; the
reverse direction writes t2i weights in diffusers format and loads them with diffusers.

SDXL-shaped UNets (second half): per-level `transformer_layers_per_block`, the `text_time` addition embedding,
linear projections and 8 GroupNorm groups; t2i gets y = cat(text_embeds, size_embedding(time_ids)). Published
SDXL configs map onto configs/sd/sdxl*.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from t2i.convert.unet_diffusers import (
    addition_time_embed_dim,
    diffusers_to_unet_config,
    load_unet_from_diffusers,
    save_unet_as_diffusers,
    t2i_to_diffusers_key_map,
    t2i_to_diffusers_state_dict,
    unet_config_to_diffusers,
)
from t2i.errors import ConfigError, PipelineLoadError, WeightsMismatchError
from t2i.models.layers import size_embedding
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


def random_diffusers_unet(seed: int, **config) -> UNet2DConditionModel:
    """A 16x16, 4-channel UNet2DConditionModel with `config` on top, every parameter random."""
    model = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, cross_attention_dim=CONTEXT_DIM, **config
    )
    randomize_(model, seed)
    return model.eval()


def tiny_diffusers_unet(kind: str, seed: int = 0) -> UNet2DConditionModel:
    return random_diffusers_unet(seed, norm_num_groups=32, **CASES[kind])


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


# ---------------------------------------------------------------- SDXL

POOLED_DIM, TIME_DIM = 12, 8

# SDXL base shape: no attention at level 0, depths 1 and 2 below, mid block depth 2 (the last entry).
BASE_STYLE = {
    "block_out_channels": (16, 32, 64),
    "layers_per_block": 2,
    "transformer_layers_per_block": [0, 1, 2],
    "attention_head_dim": [2, 4, 8],  # diffusers' name for the head count: a constant head width of 8
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "time_ids": 6,  # original size, crop top-left, target size
}
# SDXL refiner shape: four levels, attention at the two middle ones, one depth everywhere, 5 time ids.
REFINER_STYLE = {
    "block_out_channels": (16, 32, 32, 32),
    "layers_per_block": 1,
    "transformer_layers_per_block": 2,
    "attention_head_dim": [2, 4, 4, 4],
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "time_ids": 5,  # original size, crop top-left, aesthetic score
}
SDXL_CASES = {"base": BASE_STYLE, "refiner": REFINER_STYLE}


def tiny_sdxl_unet(kind: str, seed: int = 0) -> UNet2DConditionModel:
    spec = {k: v for k, v in SDXL_CASES[kind].items() if k != "time_ids"}
    return random_diffusers_unet(
        seed,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=POOLED_DIM + SDXL_CASES[kind]["time_ids"] * TIME_DIM,
        **spec,
    )


def sdxl_inputs(time_ids: int, size: int = 16):
    """(sample, t, encoder_hidden_states, text_embeds, time_ids) with SDXL-like size values."""
    g = torch.Generator().manual_seed(7)
    ids = torch.tensor([[1024.0, 768.0, 0.0, 32.0, 1024.0, 1024.0], [512.0, 512.0, 64.0, 0.0, 896.0, 1152.0]])
    if time_ids == 5:
        ids = torch.cat([ids[:, :4], torch.tensor([[6.0], [2.5]])], dim=1)  # aesthetic score last
    return (
        torch.randn(2, 4, size, size, generator=g),
        torch.tensor([1.0, 871.0]),
        torch.randn(2, 6, CONTEXT_DIM, generator=g),
        torch.randn(2, POOLED_DIM, generator=g),
        ids,
    )


def adm_vector(text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([text_embeds, size_embedding(time_ids, TIME_DIM)], dim=-1)


def diffusers_forward(model, x, t, ctx, text_embeds, time_ids) -> torch.Tensor:
    cond = {"text_embeds": text_embeds, "time_ids": time_ids}
    return model(x, t, encoder_hidden_states=ctx, added_cond_kwargs=cond).sample


@pytest.fixture(scope="module", params=list(SDXL_CASES))
def saved_sdxl(request, tmp_path_factory):
    ref = tiny_sdxl_unet(request.param)
    folder = tmp_path_factory.mktemp(f"sdxl_{request.param}")
    ref.save_pretrained(folder, safe_serialization=True)
    return request.param, ref, folder


def test_size_embedding_matches_diffusers_add_time_proj():
    from diffusers.models.embeddings import Timesteps

    time_ids = sdxl_inputs(6)[4]
    expected = Timesteps(256, True, 0)(time_ids.flatten()).reshape(2, -1)
    got = size_embedding(time_ids)
    assert got.shape == (2, 6 * 256)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_flash_attention", [True, False])
def test_sdxl_diffusers_folder_loads_and_matches_reference(saved_sdxl, use_flash_attention):
    kind, ref, folder = saved_sdxl
    ours = load_unet_from_diffusers(folder, use_flash_attention=use_flash_attention)
    c = ours.unet_config
    assert (c["num_classes"], c["adm_in_channels"], c["norm_num_groups"]) == (
        "sequential",
        POOLED_DIM + SDXL_CASES[kind]["time_ids"] * TIME_DIM,
        8,
    )
    assert c["transformer_depth"] == ([0, 1, 2] if kind == "base" else 2)
    x, t, ctx, text_embeds, time_ids = sdxl_inputs(SDXL_CASES[kind]["time_ids"])
    with torch.no_grad():
        expected = diffusers_forward(ref, x, t, ctx, text_embeds, time_ids)
        got = ours(x, t, ctx, None, y=adm_vector(text_embeds, time_ids))
        without_sizes = ours(x, t, ctx, None, y=adm_vector(text_embeds, time_ids + 64.0))
    diff = (got - expected).abs().max().item()
    print(f"sdxl {kind} diffusers->t2i max |diff| {diff:.2e} (output scale {expected.abs().max():.2f})")
    assert diff < 1e-6
    # the size conditioning reaches the output far above the parity error
    assert (without_sizes - expected).abs().max().item() > 20 * max(diff, 1e-6)


def test_sdxl_t2i_weights_export_to_diffusers_and_match(saved_sdxl, tmp_path):
    kind, _ref, folder = saved_sdxl
    ours = load_unet_from_diffusers(folder)
    randomize_(ours, seed=3)  # fresh weights so the round trip cannot pass by returning the originals
    out = save_unet_as_diffusers(ours, tmp_path / "unet", addition_time_embed_dim=TIME_DIM)
    theirs = UNet2DConditionModel.from_pretrained(out).eval()
    assert theirs.config.addition_embed_type == "text_time" and theirs.config.norm_num_groups == 8
    x, t, ctx, text_embeds, time_ids = sdxl_inputs(SDXL_CASES[kind]["time_ids"])
    with torch.no_grad():
        expected = ours(x, t, ctx, y=adm_vector(text_embeds, time_ids))
        got = diffusers_forward(theirs, x, t, ctx, text_embeds, time_ids)
    diff = (got - expected).abs().max().item()
    print(f"sdxl {kind} t2i->diffusers max |diff| {diff:.2e}")
    assert diff < 1e-6


def test_label_emb_keys_map_to_add_embedding():
    config = diffusers_to_unet_config(tiny_sdxl_unet("base").config)
    key_map = t2i_to_diffusers_key_map(config)
    assert key_map["label_emb.0.0.weight"] == "add_embedding.linear_1.weight"
    assert key_map["label_emb.0.2.bias"] == "add_embedding.linear_2.bias"
    assert not any(k.startswith("input_blocks.1.1") for k in key_map)  # level 0 has no transformer
    assert key_map["input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] == (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    )
    assert key_map["middle_block.1.transformer_blocks.1.ff.net.2.weight"] == (
        "mid_block.attentions.0.transformer_blocks.1.ff.net.2.weight"
    )


def published_sdxl_config(name: str) -> dict:
    """The fields of stabilityai SDXL 1.0 base / refiner unet/config.json that shape the network."""
    common = {
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_attention_heads": None,
        "sample_size": 128,
        "use_linear_projection": True,
        "upcast_attention": None,
    }
    if name == "sdxl":
        return {
            **common,
            "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280],
            "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "projection_class_embeddings_input_dim": 2816,
            "transformer_layers_per_block": [1, 2, 10],
        }
    return {
        **common,
        "attention_head_dim": [6, 12, 24, 24],
        "block_out_channels": [384, 768, 1536, 1536],
        "cross_attention_dim": 1280,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "projection_class_embeddings_input_dim": 2560,
        "transformer_layers_per_block": 4,
    }


@pytest.mark.parametrize("name", ["sdxl", "sdxl-refiner"])
def test_published_sdxl_configs_build_the_same_unet_as_our_yaml(name):
    published = published_sdxl_config(name)
    ours = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml").model.unet_config)
    converted = diffusers_to_unet_config(published)
    with torch.device("meta"):
        from_yaml, from_diffusers = UNetModel(**ours), UNetModel(**converted)
    shapes = {k: v.shape for k, v in from_yaml.state_dict().items()}
    assert shapes == {k: v.shape for k, v in from_diffusers.state_dict().items()}
    assert addition_time_embed_dim(published) == 256
    back = unet_config_to_diffusers(ours)
    for key in ("attention_head_dim", "transformer_layers_per_block", "down_block_types", "up_block_types",
                "projection_class_embeddings_input_dim", "addition_time_embed_dim", "block_out_channels"):  # fmt: skip
        assert back[key] == published[key], key


def test_sdxl_base_diffusers_config_reads_as_per_level_depths():
    converted = diffusers_to_unet_config(published_sdxl_config("sdxl"))
    assert converted["transformer_depth"] == [0, 2, 10]
    assert converted["transformer_depth_middle"] is None
    assert converted["attention_resolutions"] == [4, 2]
    assert (converted["num_heads"], converted["num_head_channels"]) == (-1, 64)
    refiner = diffusers_to_unet_config(published_sdxl_config("sdxl-refiner"))
    assert (refiner["transformer_depth"], refiner["adm_in_channels"]) == (4, 2560)


def sdxl_yaml_unet_config() -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / "sdxl.yaml").model.unet_config)


def test_what_still_cannot_map_is_a_one_line_config_error():
    base = published_sdxl_config("sdxl")
    with pytest.raises(ConfigError, match=r"addition_embed_type: 'text'") as info:
        diffusers_to_unet_config({**base, "addition_embed_type": "text"})
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="transformer_layers_per_block"):
        diffusers_to_unet_config({**base, "transformer_layers_per_block": [[1, 1], [2, 2], [10, 10]]})
    with pytest.raises(ConfigError, match="depth 0"):
        diffusers_to_unet_config({**base, "transformer_layers_per_block": [1, 0, 10]})
    no_middle = {**sdxl_yaml_unet_config(), "transformer_depth_middle": 0}
    with pytest.raises(ConfigError, match="transformer_depth_middle: 0"):
        unet_config_to_diffusers(no_middle)
    uneven_middle = {**sdxl_yaml_unet_config(), "transformer_depth_middle": 3}
    with pytest.raises(ConfigError, match="transformer_depth_middle: 3 differs"):
        unet_config_to_diffusers(uneven_middle)


@pytest.mark.gpu
def test_sdxl_bf16_cuda_matches_float32_reference(saved_sdxl):
    """On a GPU in bf16 (SDPA kernels), the SDXL-shaped t2i UNet stays close to diffusers in float32."""
    kind, ref, folder = saved_sdxl
    ours = load_unet_from_diffusers(folder, dtype=torch.bfloat16).cuda()
    x, t, ctx, text_embeds, time_ids = sdxl_inputs(SDXL_CASES[kind]["time_ids"])
    with torch.no_grad():
        expected = diffusers_forward(ref, x, t, ctx, text_embeds, time_ids)
        y = adm_vector(text_embeds, time_ids).cuda()
        got = ours(x.cuda(), t.cuda(), ctx.cuda(), y=y).float().cpu()
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel.item() < 5e-2
