"""UNetModel: parameter counts of the real SD configs, config errors, attention math, checkpointing, layouts.

Diffusers parity lives in tests/convert/test_unet_diffusers.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from t2i.errors import ConfigError, InvalidInputError
from t2i.models.attention import attention
from t2i.models.layers import timestep_embedding
from t2i.models.unet import UNetModel

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "sd"

TINY = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [1, 2],
    "num_res_blocks": 1,
    "channel_mult": [1, 2],
    "num_heads": 4,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 16,
    "legacy": False,
    "use_flash_attention": True,
}


def yaml_unet_config(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml").model.unet_config)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter (zero-initialised output convs would hide most of the network)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def tiny_inputs(batch: int = 2, tokens: int = 5, size: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.tensor([3.0, 700.0])[:batch]
    ctx = torch.randn(batch, tokens, 16, generator=g)
    return x, t, ctx


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sd15", 859_520_964),
        ("sd2", 865_910_724),
        ("sd21-v", 865_910_724),
        ("sdxl", 2_567_463_684),
        ("sdxl-refiner", 2_259_526_660),
    ],
)
def test_sd_parameter_counts_match_the_released_unets(name, expected):
    with torch.device("meta"):
        model = UNetModel(**yaml_unet_config(name))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_sd15_uses_compvis_key_names():
    with torch.device("meta"):
        keys = set(UNetModel(**yaml_unet_config("sd15")).state_dict())
    # Names as they appear in the original v1-5 single file after stripping `model.diffusion_model.`.
    for key in [
        "time_embed.0.weight",
        "time_embed.2.bias",
        "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.2.weight",
        "input_blocks.1.1.proj_in.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
        "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight",
        "middle_block.1.norm.weight",
        "middle_block.2.emb_layers.1.bias",
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.11.1.proj_out.bias",
        "out.0.weight",
        "out.2.weight",
    ]:
        assert key in keys, key
    assert not any(k.startswith("input_blocks.10.1") for k in keys)  # deepest level has no attention


def test_unknown_key_is_a_config_error_listing_valid_keys():
    with pytest.raises(
        ConfigError, match=r"unet_config\.num_head: unknown key; valid keys: .*num_head_channels"
    ):
        UNetModel(**TINY, num_head=4)


def test_missing_heads_is_a_config_error():
    with pytest.raises(ConfigError, match="num_heads"):
        UNetModel(**{**TINY, "num_heads": -1, "num_head_channels": -1})


def test_timestep_embedding_matches_closed_form():
    t = torch.tensor([0.0, 1.0, 999.0, 12.5])
    dim, half = 8, 4
    emb = timestep_embedding(t, dim)
    for row, tv in enumerate(t.tolist()):
        for i in range(half):
            angle = tv * math.exp(-math.log(10000.0) * i / half)
            assert emb[row, i].item() == pytest.approx(math.cos(angle), abs=1e-5)
            assert emb[row, half + i].item() == pytest.approx(math.sin(angle), abs=1e-5)


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_attention_matches_reference_and_mask_drops_keys(use_sdpa):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=g) for _ in range(3))
    k, v = k[:, :, :5], v[:, :, :5]
    ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v
    torch.testing.assert_close(attention(q, k, v, use_sdpa=use_sdpa), ref, atol=1e-5, rtol=1e-5)
    mask = torch.tensor([[True, True, False, True, False], [True] * 5])
    out = attention(q, k, v, mask=mask, use_sdpa=use_sdpa)
    keep = [0, 1, 3]
    torch.testing.assert_close(
        out[0], attention(q[:1], k[:1, :, keep], v[:1, :, keep], use_sdpa=False)[0], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5)


def test_context_mask_equals_dropping_masked_tokens():
    model = randomized(UNetModel(**TINY)).eval()
    x, t, ctx = tiny_inputs()
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    with torch.no_grad():
        masked = model(x, t, ctx, mask)
        assert torch.allclose(
            model(x, t, ctx, torch.ones(2, 5, dtype=torch.bool)), model(x, t, ctx), atol=1e-6
        )
        first = model(x[:1], t[:1], ctx[:1, :3])
    torch.testing.assert_close(masked[:1], first, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(masked[:1], model(x[:1], t[:1], ctx[:1]), atol=1e-4)


def test_sdpa_and_explicit_attention_agree():
    x, t, ctx = tiny_inputs()
    fused = randomized(UNetModel(**TINY)).eval()
    explicit = UNetModel(**{**TINY, "use_flash_attention": False}).eval()
    explicit.load_state_dict(fused.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fused(x, t, ctx), explicit(x, t, ctx), atol=1e-5, rtol=1e-5)


class ForwardCounter:
    """Forward hook counting how many times the hooked modules ran."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *_: object) -> None:
        self.calls += 1


def test_checkpointing_gives_same_output_and_gradients():
    x, t, ctx = tiny_inputs()
    plain = randomized(UNetModel(**TINY)).train()
    ckpt = UNetModel(**{**TINY, "use_checkpoint": True}).train()
    ckpt.load_state_dict(plain.state_dict())
    outs, calls = [], []
    for model in (plain, ckpt):
        counter = ForwardCounter()
        model.input_blocks[1][1].transformer_blocks[0].attn1.register_forward_hook(counter)
        model.input_blocks[1][0].in_layers.register_forward_hook(counter)
        out = model(x, t, ctx)
        out.square().mean().backward()
        outs.append(out.detach())
        calls.append(counter.calls)
    assert calls == [2, 4]  # checkpointed blocks run their forward again during backward
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_channels_last_input_gives_same_output():
    model = randomized(UNetModel(**TINY)).eval()
    x, t, ctx = tiny_inputs()
    with torch.no_grad():
        ref = model(x, t, ctx)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.to(memory_format=torch.channels_last), t, ctx)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_scalar_timestep_broadcasts_over_batch():
    model = randomized(UNetModel(**TINY)).eval()
    x, _, ctx = tiny_inputs()
    with torch.no_grad():
        out = model(x, torch.tensor(5), ctx)
        ref = model(x, torch.tensor([5, 5]), ctx)
    torch.testing.assert_close(out, ref)


def test_plain_attention_block_matches_per_head_softmax():
    """use_spatial_transformer: false uses openaimodel's AttentionBlock with the legacy per-head q/k/v layout."""
    cfg = {
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "attention_resolutions": [2],
        "num_res_blocks": 1,
        "channel_mult": [1, 2],
        "num_heads": 2,
        "use_spatial_transformer": False,
        "context_dim": None,
        "legacy": True,
        "use_flash_attention": True,
    }
    model = randomized(UNetModel(**cfg)).eval()
    block = model.input_blocks[3][1]
    x = torch.randn(1, 64, 4, 4)
    with torch.no_grad():
        qkv = block.qkv(block.norm(x).reshape(1, 64, 16))[0]  # (3C, N): per head [q; k; v] of 32 rows
        heads = []
        for h in range(2):
            q, k, v = qkv[h * 96 : (h + 1) * 96].split(32)
            w = torch.softmax(q.T @ k / math.sqrt(32), dim=-1)  # (Nq, Nk)
            heads.append((w @ v.T).T)
        ref = x + block.proj_out(torch.cat(heads)[None]).reshape(1, 64, 4, 4)
        torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- SDXL configuration of the same network

SDXL_TINY = {
    **TINY,
    "model_channels": 16,
    "attention_resolutions": [4, 2, 1],
    "channel_mult": [1, 2, 2],
    "num_heads": -1,
    "num_head_channels": 8,
    "use_linear_in_transformer": True,
    "transformer_depth": [0, 1, 2],
    "num_classes": "sequential",
    "adm_in_channels": 10,
    "norm_num_groups": 8,
}


def test_sdxl_uses_sgm_key_names():
    with torch.device("meta"):
        keys = set(UNetModel(**yaml_unet_config("sdxl")).state_dict())
    # Names as they appear in the SDXL base single file after stripping `model.diffusion_model.`.
    for key in [
        "label_emb.0.0.weight",
        "label_emb.0.2.bias",
        "input_blocks.3.0.op.weight",
        "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
        "input_blocks.7.1.transformer_blocks.9.ff.net.2.weight",
        "middle_block.1.transformer_blocks.9.norm3.weight",
        "output_blocks.2.1.transformer_blocks.9.attn1.to_q.weight",
        "output_blocks.5.2.conv.weight",
        "out.2.weight",
    ]:
        assert key in keys, key
    assert not any(
        k.startswith(("input_blocks.1.1", "output_blocks.8.1")) for k in keys
    )  # level 0: no transformer
    assert not any("transformer_blocks.10." in k for k in keys)
    assert not any(k.startswith("input_blocks.4.1.transformer_blocks.2.") for k in keys)


def test_depth_zero_levels_have_no_transformer_and_middle_depth_defaults_to_the_last():
    model = UNetModel(**SDXL_TINY)
    transformers = [type(m).__name__ for m in model.input_blocks[1]]
    assert transformers == ["ResBlock"]  # level 0, depth 0: even though 1 is in attention_resolutions
    assert len(model.input_blocks[3][1].transformer_blocks) == 1
    assert len(model.input_blocks[5][1].transformer_blocks) == 2
    assert len(model.middle_block[1].transformer_blocks) == 2
    no_middle = UNetModel(**{**SDXL_TINY, "transformer_depth_middle": 0})
    assert isinstance(no_middle.middle_block[1], torch.nn.Identity)
    assert "middle_block.2.in_layers.0.weight" in no_middle.state_dict()  # sgm's index is kept
    assert all(isinstance(m, torch.nn.GroupNorm) and m.num_groups == 8
               for m in model.modules() if isinstance(m, torch.nn.GroupNorm))  # fmt: skip


def test_adm_vector_is_embedded_and_added_to_the_time_embedding():
    model = randomized(UNetModel(**SDXL_TINY)).eval()
    x, t, ctx = tiny_inputs()
    y = torch.randn(2, 10, generator=torch.Generator().manual_seed(4))
    captured = []
    model.input_blocks[1][0].register_forward_hook(lambda m, args, out: captured.append(args[1]))
    with torch.no_grad():
        out = model(x, t, ctx, y=y)
        other = model(x, t, ctx, y=y.flip(0))
    mlp = model.label_emb[0]
    expected_emb = model.time_embed(timestep_embedding(t, 16)) + mlp[2](F.silu(mlp[0](y)))
    torch.testing.assert_close(captured[0], expected_emb)
    assert not torch.allclose(out, other, atol=1e-4)


def test_adm_input_errors_name_y():
    model = UNetModel(**SDXL_TINY).eval()
    x, t, ctx = tiny_inputs()
    with pytest.raises(InvalidInputError, match=r"y: missing; .* shape \(2, 10\)"):
        model(x, t, ctx)
    with pytest.raises(InvalidInputError, match=r"y: shape \(2, 9\)"):
        model(x, t, ctx, y=torch.zeros(2, 9))
    with pytest.raises(InvalidInputError, match="y: given, but unet_config.num_classes is null"):
        UNetModel(**TINY)(x, t, ctx, y=torch.zeros(2, 10))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"transformer_depth": [1, 2]}, r"transformer_depth: \[1, 2\] has 2 entries; expected .* \(3\)"),
        ({"transformer_depth_middle": -1}, "transformer_depth_middle"),
        ({"num_classes": None}, "adm_in_channels: needs num_classes: sequential"),
        ({"num_classes": "continuous"}, "num_classes: 'continuous' is not supported"),
        ({"adm_in_channels": None}, "adm_in_channels: expected an int"),
        ({"norm_num_groups": 12}, "multiple of norm_num_groups"),
    ],
)
def test_bad_sdxl_keys_are_config_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        UNetModel(**{**SDXL_TINY, **change})


def test_unet_config_dataclass_is_the_single_source_of_keys_and_defaults():
    from t2i.config import UNetConfig, load_config
    from t2i.models.unet_layout import UNET_CONFIG_KEYS

    defaults = UNetConfig().model_kwargs()
    assert set(UNET_CONFIG_KEYS) == set(defaults)
    with torch.device("meta"):
        assert UNetModel().unet_config == defaults
    cfg = load_config("sdxl")  # the YAML loader validates the new keys' types
    assert cfg.model.unet_config.transformer_depth == [0, 2, 10]
    assert cfg.model.unet_config.model_kwargs() == {**defaults, **yaml_unet_config("sdxl")}
    with pytest.raises(ConfigError, match="num_classes: 'labels' is not one of sequential"):
        load_config("sdxl", ["model.unet_config.num_classes=labels"])
