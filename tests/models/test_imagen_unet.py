"""Imagen Regular UNet and Efficient UNet: size-table configs, attention kinds, exact reformulations, masks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from t2i.errors import ConfigError, InvalidInputError
from t2i.models.efficient_unet import EfficientUNet
from t2i.models.imagen_attention import attention_core
from t2i.models.imagen_blocks import EfficientResBlock
from t2i.models.imagen_unet import ImagenUNet, build_imagen_unet

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "imagen"
TARGET_PARAMS_M = {  # NeMo Imagen size table (UNet parameters, millions)
    "base64-500m": 524,
    "base64-2b": 2100,
    "sr256-400m": 429,
    "sr256-600m": 646,
    "sr1024-400m": 427,
}
TEXT_DIM, TOKENS, SIZE = 12, 5, 8


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run faster on one thread, and much faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_regular(**overrides) -> dict:
    cfg = dict(  # noqa: C408 (keyword form reads like the YAML)
        embed_dim=16, image_size=SIZE, channels=3, text_embed_dim=TEXT_DIM, num_res_blocks=[1, 2],
        channel_mult=[1, 2], per_head_channels=8, cond_dim=16, attention_type="fused",
        learned_sinu_pos_emb_dim=0, attention_resolutions=[SIZE, SIZE // 2],
    )  # fmt: skip
    return {**cfg, **overrides}


def tiny_efficient(**overrides) -> dict:
    cfg = dict(  # noqa: C408 (keyword form reads like the YAML)
        embed_dim=16, image_size=SIZE, channels=3, text_embed_dim=TEXT_DIM, channel_mult=[1, 2, 2],
        num_resblocks=[1, 1, 2], atnn_enabled_at=[0, 1, 1], per_head_channels=8, attention_type="fused",
        learned_sinu_pos_emb_dim=0, skip_connection_scaling=True, noise_cond_aug=True,
    )  # fmt: skip
    return {**cfg, **overrides}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (the zero-initialised output projections included), so every path matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = p.dim() == 1 and name.endswith("weight")
            std = 0.3 if p.dim() > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if is_norm_scale else 0.0))
    return model.eval()


def inputs(batch: int = 2, size: int = SIZE, seed: int = 1, sr: bool = False, aug: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, TOKENS, dtype=torch.bool)
    mask[0, 3:] = False
    args = {
        "x": torch.randn(batch, 3, size, size, generator=gen),
        "time_cond": torch.randn(batch, generator=gen),
        "text_embed": torch.randn(batch, TOKENS, TEXT_DIM, generator=gen),
        "text_mask": mask,
    }
    if sr:
        args["x_low_res"] = torch.randn(batch, 3, size // 4, size // 4, generator=gen)
    if aug:
        args["aug_cond"] = torch.rand(batch, generator=gen)
    return args


def build(unet_type: str, cfg: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize(build_imagen_unet(unet_type, cfg), seed)


def double(model: torch.nn.Module, args: dict) -> tuple[torch.nn.Module, dict]:
    """float64 model and inputs: exact reformulations then agree far below any real discrepancy."""
    cast = {k: v.double() if v.is_floating_point() else v for k, v in args.items()}
    return model.double(), cast


def case(unet_type: str, **overrides) -> tuple[dict, dict]:
    """(config, forward kwargs) for a tiny model of unet_type."""
    if unet_type == "sr":
        return tiny_efficient(**overrides), inputs(sr=True, aug=True)
    if unet_type == "sr-unet":
        return tiny_regular(noise_cond_aug=True, **overrides), inputs(sr=True, aug=True)
    return tiny_regular(**overrides), inputs()


# --------------------------------------------------------------------------------------------- size table
@pytest.mark.parametrize("name", sorted(TARGET_PARAMS_M))
def test_size_table_parameter_count_within_10_percent(name):
    model_cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]
    assert model_cfg["kind"] == "imagen"
    with torch.device("meta"):
        model = build_imagen_unet(model_cfg["unet_type"], model_cfg["unet"])
    count = sum(p.numel() for p in model.parameters()) / 1e6
    target = TARGET_PARAMS_M[name]
    assert abs(count - target) <= 0.10 * target, f"{name}: {count:.1f}M vs target {target}M"


# ---------------------------------------------------------------------------------------- forward/backward
@pytest.mark.parametrize("unet_type", ["base", "sr-unet", "sr"])
@pytest.mark.parametrize("attention_type", ["self", "cross", "stacked", "fused"])
def test_forward_backward_every_attention_type(unet_type, attention_type):
    cfg, args = case(
        unet_type, attention_type=attention_type, learned_sinu_pos_emb_dim=8, use_null_token=True
    )
    model = build(unet_type, cfg).train()
    out = model(**args)
    assert out.shape == args["x"].shape
    out.square().mean().backward()
    unused = ("text.null_text_embedding", "text.text_to_cond") if attention_type == "self" else ()
    for name, p in model.named_parameters():
        if name.startswith(unused):  # self-attention never reads the token context
            assert p.grad is None, name
            continue
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # the text reaches the output through the pooled vector and (except 'self') the attention
    other = dict(args, text_embed=args["text_embed"] + 1.0)
    with torch.no_grad():
        assert not torch.allclose(model.eval()(**args), model(**other))


def test_text_embed_none_is_unconditional():
    model = build("base", tiny_regular(use_null_token=True))
    args = inputs()
    with torch.no_grad():
        out = model(args["x"], args["time_cond"], None, None)
        all_padding = model(
            args["x"], args["time_cond"], args["text_embed"], torch.zeros(2, TOKENS, dtype=bool)
        )
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, all_padding)


# --------------------------------------------------------------------------------- exact reformulations
@pytest.mark.parametrize("unet_type", ["base", "sr"])
@pytest.mark.parametrize("attention_type", ["cross", "fused", "stacked"])
def test_flash_and_stable_attention_give_the_same_output(unet_type, attention_type):
    outputs = []
    for flash, stable in [(False, False), (False, True), (True, False)]:
        cfg, args = case(
            unet_type, attention_type=attention_type, flash_attention=flash, stable_attention=stable
        )
        model, args = double(build(unet_type, cfg), args)
        with torch.no_grad():
            outputs.append(model(**args))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(outputs[2], outputs[0], rtol=1e-9, atol=1e-9)


def naive_attention(q, k, v, mask):
    """Loop reference: per batch/head softmax over the real keys only; zeros when there is none."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        keep = mask[b]
        if not keep.any():
            continue
        for h in range(q.shape[1]):
            w = (q[b, h] @ k[b, h, keep].T / math.sqrt(q.shape[-1])).softmax(-1)
            out[b, h] = w @ v[b, h, keep]
    return out


@pytest.mark.parametrize("flash,stable", [(False, False), (False, True), (True, False)])
def test_attention_core_matches_reference_and_masks_keys(flash, stable):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 2, 5, 8, generator=gen) for _ in range(3))
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = attention_core(q, k, v, mask, stable=stable, flash=flash)
    torch.testing.assert_close(out, naive_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("unet_type", ["base", "sr"])
def test_gradient_checkpointing_same_output_and_gradients(unet_type):
    results = []
    for checkpointing in (False, True):
        cfg, args = case(unet_type, attention_type="stacked", gradient_checkpointing=checkpointing)
        model = build(unet_type, cfg).train()
        out = model(**args)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------ masking
@pytest.mark.parametrize("unet_type", ["base", "sr"])
@pytest.mark.parametrize("attention_type", ["cross", "fused"])
@pytest.mark.parametrize("pooling,null_token", [("attention", False), ("mean", True)])
def test_padding_tokens_do_not_change_the_output(unet_type, attention_type, pooling, null_token):
    cfg, args = case(
        unet_type, attention_type=attention_type, feature_pooling_type=pooling, use_null_token=null_token
    )
    model, args = double(build(unet_type, cfg), args)
    garbage = dict(args, text_embed=args["text_embed"].clone())
    garbage["text_embed"][0, 3:] = 100 * torch.randn(TOKENS - 3, TEXT_DIM, dtype=torch.float64)
    longer = dict(args)  # the same prompts padded to 9 tokens
    longer["text_embed"] = F.pad(args["text_embed"], (0, 0, 0, 4), value=7.0)
    longer["text_mask"] = F.pad(args["text_mask"], (0, 4), value=False)
    with torch.no_grad():
        reference = model(**args)
        torch.testing.assert_close(model(**garbage), reference)
        torch.testing.assert_close(model(**longer), reference)
        # a real token does change it
        real = dict(args, text_mask=torch.ones_like(args["text_mask"]))
        assert not torch.allclose(model(**real)[0], reference[0], atol=1e-3)


@pytest.mark.parametrize("unet_type", ["base", "sr"])
def test_channels_last_input_gives_the_same_output(unet_type):
    cfg, args = case(unet_type)
    model = build(unet_type, cfg)
    cl = dict(args, x=args["x"].to(memory_format=torch.channels_last))
    with torch.no_grad():
        torch.testing.assert_close(model.to(memory_format=torch.channels_last)(**cl), model(**args))


# ---------------------------------------------------------------------------------------------- SR inputs
@pytest.mark.parametrize("unet_type", ["sr-unet", "sr"])
def test_sr_stage_uses_low_res_image_and_aug_cond(unet_type):
    cfg, args = case(unet_type)
    model = build(unet_type, cfg)
    upsampled = F.interpolate(
        args["x_low_res"], size=args["x"].shape[-2:], mode="bicubic", align_corners=False
    )
    with torch.no_grad():
        out = model(**args)
        torch.testing.assert_close(model(**dict(args, x_low_res=upsampled)), out)
        assert not torch.allclose(model(**dict(args, x_low_res=args["x_low_res"] + 1)), out, atol=1e-4)
        assert not torch.allclose(model(**dict(args, aug_cond=args["aug_cond"] + 0.5)), out, atol=1e-4)
    assert model.lowres_time_embed is not model.time_embed


def test_missing_or_unexpected_sr_inputs_raise():
    cfg, args = case("sr-unet")
    model = build("sr-unet", cfg)
    with pytest.raises(InvalidInputError, match="x_low_res"):
        model(**dict(args, x_low_res=None))
    with pytest.raises(InvalidInputError, match="aug_cond"):
        model(**dict(args, aug_cond=None))
    base = build("base", tiny_regular())
    with pytest.raises(InvalidInputError, match="x_low_res"):
        base(**args)


# ------------------------------------------------------------------------------------- Efficient structure
def test_efficient_unet_resamples_outside_the_convolutions():
    model = EfficientUNet(**tiny_efficient())
    first, last = model.DBlocks[0][0], model.UBlocks[0][-1]
    assert isinstance(first, torch.nn.Conv2d) and first.stride == (2, 2)  # down before the ResBlocks
    assert isinstance(last, torch.nn.ConvTranspose2d) and last.stride == (2, 2)  # up after them
    seen = {}

    def record(key):
        def hook(module, args, output):
            seen[key] = output.shape[-1]

        return hook

    model.DBlocks[0][1].register_forward_hook(record("d0"))
    model.UBlocks[0][0].register_forward_hook(record("u0"))
    with torch.no_grad():
        model(**inputs(sr=True, aug=True))
    assert seen == {"d0": SIZE // 2, "u0": SIZE // 2}  # level-0 ResBlocks run at half the input resolution


def test_efficient_resblock_scales_the_shortcut_by_inverse_sqrt2():
    block = EfficientResBlock(8, 16, 8, skip_scaling=True).eval()  # out conv is zero-initialised
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 16)
    torch.testing.assert_close(block(x, emb), block.shortcut(x) / math.sqrt(2))


# ------------------------------------------------------------------------------------------------ configs
def test_unknown_key_raises_config_error_listing_valid_keys():
    with pytest.raises(
        ConfigError, match=r"model\.unet\.atention_type: unknown key; valid keys: .*attention_type"
    ):
        build_imagen_unet("base", tiny_regular(atention_type="fused"))
    with pytest.raises(
        ConfigError, match=r"model\.unet\.attention_resolutions: unknown key.*atnn_enabled_at"
    ):
        build_imagen_unet("sr", tiny_efficient(attention_resolutions=[8]))


@pytest.mark.parametrize(
    "unet_type,cfg,match",
    [
        ("base", tiny_regular(attention_type="linear"), "attention_type"),
        ("base", tiny_regular(feature_pooling_type="max"), "feature_pooling_type"),
        ("base", tiny_regular(num_res_blocks=[1, 2, 3]), "num_res_blocks"),
        ("base", tiny_regular(attention_resolutions=[5]), "attention_resolutions"),
        ("base", tiny_regular(noise_cond_aug=True), "noise_cond_aug"),
        ("sr", tiny_efficient(atnn_enabled_at=[0, 1]), "atnn_enabled_at"),
        ("sr", tiny_efficient(stride=3), "stride"),
        ("upscaler", tiny_regular(), "unet_type"),
    ],
)
def test_invalid_values_raise_config_error(unet_type, cfg, match):
    with pytest.raises(ConfigError, match=match):
        build_imagen_unet(unet_type, cfg)


def test_sr_unet_type_defaults_to_low_res_conditioning():
    model = build_imagen_unet("sr-unet", tiny_regular())
    assert isinstance(model, ImagenUNet) and model.low_res_cond
    assert model.input_blocks[0][0].in_channels == 6


@pytest.mark.parametrize("resblock_updown,resample_with_conv", [(True, True), (False, False)])
def test_regular_unet_resampling_variants(resblock_updown, resample_with_conv):
    cfg = tiny_regular(resblock_updown=resblock_updown, resample_with_conv=resample_with_conv, dropout=0.1)
    model = build("base", cfg)
    args = inputs()
    with torch.no_grad():
        out = model(**args)
    assert out.shape == args["x"].shape and torch.isfinite(out).all()
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.ConvTranspose2d,))]
    assert bool(convs) == (resample_with_conv and not resblock_updown)
