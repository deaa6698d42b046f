"""FluxTransformer on its own: BFL key names, FLUX.1 parameter counts on meta, packing, RoPE against the
closed-form rotation, text masks, checkpointing, bf16 and input errors. Parity with diffusers lives in
tests/convert/test_flux_diffusers.py."""

from __future__ import annotations

import math

import pytest
import torch
from flux_helpers import TINY

from t2i.errors import ConfigError, InvalidInputError
from t2i.models.flux import (
    FLUX_DEV,
    FLUX_SCHNELL,
    FluxTransformer,
    apply_rope,
    image_position_ids,
    pack_latents,
    rope_frequencies,
    rotate_pairs_real,
    unpack_latents,
)

# The BFL names of one double and one single block (from flux/modules/layers.py), written out by hand.
DOUBLE_BLOCK_KEYS = [
    f"double_blocks.1.{stream}_{name}"
    for stream in ("img", "txt")
    for name in (
        "mod.lin.weight",
        "mod.lin.bias",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.norm.query_norm.scale",
        "attn.norm.key_norm.scale",
        "attn.proj.weight",
        "attn.proj.bias",
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
    )
]
SINGLE_BLOCK_KEYS = [
    "single_blocks.1.linear1.weight",
    "single_blocks.1.linear1.bias",
    "single_blocks.1.linear2.weight",
    "single_blocks.1.linear2.bias",
    "single_blocks.1.norm.query_norm.scale",
    "single_blocks.1.norm.key_norm.scale",
    "single_blocks.1.modulation.lin.weight",
    "single_blocks.1.modulation.lin.bias",
]
OUTER_KEYS = [
    "img_in.weight",
    "img_in.bias",
    "txt_in.weight",
    "txt_in.bias",
    *(
        f"{e}.{layer}.{p}"
        for e in ("time_in", "vector_in", "guidance_in")
        for layer in ("in_layer", "out_layer")
        for p in ("weight", "bias")
    ),
    "final_layer.linear.weight",
    "final_layer.linear.bias",
    "final_layer.adaLN_modulation.1.weight",
    "final_layer.adaLN_modulation.1.bias",
]


def randomized(model: FluxTransformer, seed: int = 0) -> FluxTransformer:
    """Random values everywhere (the default init zeroes modulations, which would hide most of the math)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim > 1 else 0.3))
    return model.eval()


def inputs(batch: int = 2, tokens: int = 5, side: tuple[int, int] = (8, 12)):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, *side, generator=g)
    context = torch.randn(batch, tokens, 32, generator=g)
    pooled = torch.randn(batch, 24, generator=g)
    t = torch.rand(batch, generator=g)
    guidance = torch.full((batch,), 3.5)
    return x, t, context, pooled, guidance


def test_state_dict_keys_are_the_bfl_names():
    keys = list(FluxTransformer(**TINY).state_dict())
    block1 = [k for k in keys if k.startswith(("double_blocks.1.", "single_blocks.1."))]
    assert sorted(block1) == sorted(DOUBLE_BLOCK_KEYS + SINGLE_BLOCK_KEYS)
    outer = [k for k in keys if not k.startswith(("double_blocks.", "single_blocks."))]
    assert sorted(outer) == sorted(OUTER_KEYS)
    schnell = set(FluxTransformer(**{**TINY, "guidance_embed": False}).state_dict())
    assert not any(k.startswith("guidance_in.") for k in schnell)
    no_bias = set(FluxTransformer(**{**TINY, "qkv_bias": False}).state_dict())
    assert "double_blocks.0.img_attn.qkv.bias" not in no_bias and "single_blocks.0.linear1.bias" in no_bias


@pytest.mark.parametrize(("preset", "count"), [(FLUX_DEV, 11_901_408_320), (FLUX_SCHNELL, 11_891_178_560)])
def test_flux1_parameter_counts_on_meta(preset, count):
    with torch.device("meta"):
        model = FluxTransformer(**preset)
    assert sum(p.numel() for p in model.parameters()) == count
    assert model.latent_channels == 16
    assert len(model.blocks()) == 19 + 38
    assert model.blocks()[0] is model.double_blocks[0] and model.blocks()[-1] is model.single_blocks[-1]


def test_pack_is_bfl_rearrange_and_unpack_inverts_it():
    x = torch.randn(2, 3, 4, 6)
    tokens = pack_latents(x)
    # b c (h ph) (w pw) -> b (h w) (c ph pw), spelled out for token (row 1, col 2)
    expected = torch.stack([x[:, c, 2 + dy, 4 + dx] for c in range(3) for dy in (0, 1) for dx in (0, 1)], -1)
    assert tokens.shape == (2, 6, 12)
    torch.testing.assert_close(tokens[:, 1 * 3 + 2], expected, rtol=0, atol=0)
    assert torch.equal(unpack_latents(tokens, 4, 6), x)
    ids = image_position_ids(2, 2, 3)
    assert ids.shape == (2, 6, 3) and ids[0, 5].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("form", ["complex", "real"])
def test_rope_rotates_each_pair_by_position_times_frequency(form):
    axes, theta = [4, 6, 6], 10_000.0
    ids = torch.tensor([[[0.0, 3.0, 5.0], [0.0, 1.0, 2.0]]])
    x = torch.randn(1, 2, 2, 16)  # (B, H, L, head_dim)
    rope = rope_frequencies(ids, axes, theta)
    out = apply_rope(x, rope) if form == "complex" else rotate_pairs_real(x, rope)
    expected = torch.empty_like(x)
    pair = 0
    for axis, dim in enumerate(axes):
        for j in range(dim // 2):
            for pos in range(2):
                angle = ids[0, pos, axis].item() * theta ** (-2 * j / dim)
                c, s = math.cos(angle), math.sin(angle)
                a, b = x[..., pos, 2 * pair], x[..., pos, 2 * pair + 1]
                expected[..., pos, 2 * pair] = c * a - s * b
                expected[..., pos, 2 * pair + 1] = s * a + c * b
            pair += 1
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_masked_text_tokens_equal_dropping_them():
    model = randomized(FluxTransformer(**TINY))
    x, t, context, pooled, guidance = inputs(batch=2, tokens=6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    with torch.no_grad():
        masked = model(x, t, context, pooled, guidance, context_mask=mask)
        dropped = model(x[:1], t[:1], context[:1, :4], pooled[:1], guidance[:1])
        full = model(x[1:], t[1:], context[1:], pooled[1:], guidance[1:])
    torch.testing.assert_close(masked[:1], dropped, atol=1e-5, rtol=0)
    torch.testing.assert_close(masked[1:], full, atol=1e-5, rtol=0)


def test_token_level_entry_point_matches_the_latent_one():
    model = randomized(FluxTransformer(**TINY))
    x, t, context, pooled, guidance = inputs()
    with torch.no_grad():
        latent = model(x, t, context, pooled, guidance)
        tokens = model.forward_tokens(
            pack_latents(x), image_position_ids(2, 4, 6), context, torch.zeros(2, 5, 3), t, pooled, guidance
        )
    assert torch.equal(pack_latents(latent), tokens)
    assert latent.shape == x.shape


def test_checkpointing_gives_the_same_gradients():
    model = randomized(FluxTransformer(**TINY)).train()
    x, t, context, pooled, guidance = inputs()

    def grads(flag: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.use_checkpoint = flag
        model(x, t, context, pooled, guidance).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_default_init_is_adaln_zero():
    """Fresh weights: every modulation and the final layer are zero, so the velocity starts at exactly 0."""
    model = FluxTransformer(**TINY)
    x, t, context, pooled, guidance = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, context, pooled, guidance), torch.zeros_like(x))
    assert model.img_in.weight.abs().sum() > 0


def test_bf16_forward_stays_close_to_float32():
    model = randomized(FluxTransformer(**TINY))
    x, t, context, pooled, guidance = inputs()
    with torch.no_grad():
        reference = model(x, t, context, pooled, guidance)
        low = model.to(torch.bfloat16)(x, t, context, pooled, guidance)
    assert low.dtype == torch.bfloat16
    relative = (low.float() - reference).norm() / reference.norm()
    assert relative < 0.05


def test_bad_inputs_and_configs_raise_one_line_errors():
    model = FluxTransformer(**TINY)
    x, t, context, pooled, guidance = inputs()
    with pytest.raises(InvalidInputError, match="multiples of 2"):
        model(torch.randn(2, 4, 7, 8), t, context, pooled, guidance)
    with pytest.raises(InvalidInputError, match=r"expected \(B, 4, H, W\)"):
        model(torch.randn(2, 16, 8, 8), t, context, pooled, guidance)
    with pytest.raises(InvalidInputError, match="guidance-distilled"):
        model(x, t, context, pooled)
    with pytest.raises(ConfigError, match="axes_dim"):
        FluxTransformer(**{**TINY, "axes_dim": [4, 4, 4]})
    with pytest.raises(ConfigError, match="num_heads"):
        FluxTransformer(**{**TINY, "num_heads": 5})
    with pytest.raises(ConfigError, match="in_channels: 18"):
        FluxTransformer(**{**TINY, "in_channels": 18})
