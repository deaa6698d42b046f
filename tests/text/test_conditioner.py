"""The conditioner: SDXL's two text embedders and size embedders against diffusers' `encode_prompt` and
`add_time_proj` on the same tiny random weights; dropout per embedder; precached batches; SD 1/2's one embedder;
the config schema (`conditioner_config.emb_models`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from t2i.config import build_config, load_config, to_yaml
from t2i.errors import ConfigError, DataError
from t2i.text.conditioner import (
    Conditioner,
    SizeEmbedder,
    TextEmbedder,
    build_conditioner,
    precached_keys,
    text_encoder_names,
)
from t2i.text.encoders import CLIPEncoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from sd_helpers import tiny_clip_tokenizer
from sdxl_helpers import POOLED_DIM, TEXT_DIM, TIME_DIM, tiny_sdxl_pipeline, tiny_tokenizer_2

PROMPTS = ["a red circle", "circle", ""]
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


@pytest.fixture(scope="module")
def reference():
    """diffusers' tiny StableDiffusionXLPipeline (in memory)."""
    return tiny_sdxl_pipeline()


@pytest.fixture(scope="module")
def encoders(reference):
    """t2i's encoders on the reference's weights: CLIP-L-like hidden_states[-2], bigG-like + projected pooled."""
    first = CLIPEncoder(reference.text_encoder, tiny_clip_tokenizer(), "penultimate_hidden")
    second_model = reference.text_encoder_2
    second = CLIPEncoder(second_model.text_model, tiny_tokenizer_2(), "penultimate_hidden", None,
                         second_model.text_projection)  # fmt: skip
    return first, second


def sdxl_model_config(**changes):
    """A tiny SDXL `model:` section: the bundled sdxl config's conditioner at the tiny widths."""
    model = {
        "unet_config": {"context_dim": 2 * TEXT_DIM, "num_classes": "sequential",
                        "adm_in_channels": POOLED_DIM + 6 * TIME_DIM},
        "conditioner_config": {
            "emb_models": [
                {"input_key": "captions", "ucg_rate": 0.0,
                 "emb_model": {"kind": "clip", "layer": "penultimate_hidden"}},
                {"input_key": "captions", "ucg_rate": 0.0,
                 "emb_model": {"kind": "clip", "layer": "penultimate_hidden", "always_return_pooled": True}},
                *({"input_key": k, "emb_model": {"kind": "size", "outdim": TIME_DIM}} for k in SIZE_KEYS),
            ]
        },
    }
    for path, value in changes.items():
        target = model
        *parents, last = path.split(".")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[last] = value
    return build_config({"model": model}).model


def sizes(count: int, original=(32, 48), crop=(4, 0), target=(32, 32)) -> dict[str, torch.Tensor]:
    return {
        "original_size_as_tuple": torch.tensor([original] * count, dtype=torch.float32),
        "crop_coords_top_left": torch.tensor([crop] * count, dtype=torch.float32),
        "target_size_as_tuple": torch.tensor([target] * count, dtype=torch.float32),
    }


def sdxl_conditioner(encoders, **changes) -> Conditioner:
    first, second = encoders
    return build_conditioner(sdxl_model_config(**changes), [lambda: first, lambda: second])


def test_sdxl_cond_matches_diffusers_encode_prompt_and_time_embedding(reference, encoders):
    """context = diffusers' prompt_embeds (both encoders' hidden_states[-2], concatenated); y = [pooled
    text_embeds | add_time_proj(time ids)], what the text_time UNet's add_embedding receives."""
    conditioner = sdxl_conditioner(encoders)
    cond = conditioner.encode({"captions": PROMPTS, **sizes(len(PROMPTS))}, "cpu")
    with torch.no_grad():
        context, _, pooled, _ = reference.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        time_ids = torch.tensor([[32, 48, 4, 0, 32, 32]] * len(PROMPTS), dtype=torch.float32)
        time_embeds = reference.unet.add_time_proj(time_ids.flatten()).reshape(len(PROMPTS), -1)
    assert cond["context"].shape == (3, 16, 2 * TEXT_DIM)
    torch.testing.assert_close(cond["context"], context, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cond["y"], torch.cat([pooled, time_embeds], dim=-1), atol=1e-6, rtol=1e-6)
    assert set(cond) == {"context", "y"}


def test_zero_text_is_diffusers_force_zeros(encoders):
    conditioner = sdxl_conditioner(encoders)
    batch = {"captions": ["red"] * 2, **sizes(2)}
    zero = conditioner.encode(batch, "cpu", zero_text=True)
    full = conditioner.encode(batch, "cpu")
    assert zero["context"].shape == full["context"].shape and not zero["context"].any()
    assert not zero["y"][:, :POOLED_DIM].any()
    assert torch.equal(zero["y"][:, POOLED_DIM:], full["y"][:, POOLED_DIM:])  # the sizes stay
    assert conditioner.zeros_for_empty_negative


def test_each_embedder_drops_with_its_own_rate_and_draw(encoders):
    """Text embedder 1 (bigG) drops its context slice and its pooled vector together; embedder 0 and the sizes
    keep theirs. Draws: one per embedder with a rate > 0, in order, one value per sample."""
    conditioner = sdxl_conditioner(
        encoders, **{"conditioner_config.emb_models.0.ucg_rate": 0.5, "conditioner_config.emb_models.1.ucg_rate": 0.5}
    )
    batch = {"captions": ["a red circle"] * 8, **sizes(8)}
    full = conditioner.encode(batch, "cpu")
    cond = conditioner(batch, torch.Generator().manual_seed(0), "cpu")
    draws = torch.Generator().manual_seed(0)
    keep_0 = torch.rand(8, generator=draws) >= 0.5
    keep_1 = torch.rand(8, generator=draws) >= 0.5
    assert keep_0.any() and (~keep_0).any() and not torch.equal(keep_0, keep_1)
    first, second = cond["context"][..., :TEXT_DIM], cond["context"][..., TEXT_DIM:]
    for keep, part, whole in ((keep_0, first, full["context"][..., :TEXT_DIM]),
                              (keep_1, second, full["context"][..., TEXT_DIM:])):  # fmt: skip
        assert torch.equal(part[keep], whole[keep]) and not part[~keep].any()
    assert torch.equal(cond["y"][keep_1, :POOLED_DIM], full["y"][keep_1, :POOLED_DIM])
    assert not cond["y"][~keep_1, :POOLED_DIM].any()
    assert torch.equal(cond["y"][:, POOLED_DIM:], full["y"][:, POOLED_DIM:])


def test_precached_batch_gives_the_online_cond(encoders):
    """`captions_encoded` holds both token embeddings and the pooled vector under `precached_keys(i)`."""
    first, second = encoders
    conditioner = sdxl_conditioner(encoders)
    online = conditioner.encode({"captions": PROMPTS, **sizes(3)}, "cpu")
    a, b = first.encode(PROMPTS), second.encode(PROMPTS)
    k0, k1 = precached_keys(0), precached_keys(1)
    assert (k0["embeddings"], k1["embeddings"], k1["pooled"]) == ("embeddings", "embeddings_1", "pooled_1")
    encoded = {k0["embeddings"]: a.embeddings, k0["mask"]: a.mask, k1["embeddings"]: b.embeddings,
               k1["mask"]: b.mask, k1["pooled"]: b.pooled}  # fmt: skip
    precached = conditioner.encode({"captions_encoded": encoded, **sizes(3)}, "cpu")
    for key in ("context", "y"):
        torch.testing.assert_close(precached[key], online[key], atol=0, rtol=0)
    without_pooled = {k: v for k, v in encoded.items() if k != "pooled_1"}
    with pytest.raises(DataError, match="pooled_1"):
        conditioner.encode({"captions_encoded": without_pooled, **sizes(3)}, "cpu")
    with pytest.raises(DataError, match="crop_coords_top_left"):
        conditioner.encode({"captions": PROMPTS, "original_size_as_tuple": [[1, 1]] * 3}, "cpu")


def test_unconditional_splits_the_merged_cond_per_embedder(encoders):
    """Null conditioning shaped like a merged cond: zeros for SDXL's text, zeros for the sizes; with the empty
    prompt as null (the refiner's legacy_ucg_value "") the encoding of "" and its pooled vector."""
    conditioner = sdxl_conditioner(encoders, **{"conditioner_config.emb_models.1.legacy_ucg_value": ""})
    cond = conditioner.encode({"captions": ["red", "circle"], **sizes(2)}, "cpu")
    null = conditioner.unconditional(cond)
    empty = encoders[1].encode([""])
    assert not null["context"][..., :TEXT_DIM].any() and not null["y"][:, POOLED_DIM:].any()
    torch.testing.assert_close(null["context"][..., TEXT_DIM:], empty.embeddings.expand(2, -1, -1))
    torch.testing.assert_close(null["y"][:, :POOLED_DIM], empty.pooled.expand(2, -1))
    assert not conditioner.zeros_for_empty_negative


def test_widths_are_checked_against_the_unet(encoders):
    with pytest.raises(ConfigError, match=r"context_dim: 40.*32 \+ 32"):
        sdxl_conditioner(encoders, **{"unet_config.context_dim": 40}).encode({"captions": ["a"], **sizes(1)}, "cpu")
    with pytest.raises(ConfigError, match="adm_in_channels: 81"):
        sdxl_conditioner(encoders, **{"unet_config.adm_in_channels": 81}).encode(
            {"captions": ["a"], **sizes(1)}, "cpu"
        )


def test_text_encoder_names_follow_diffusers():
    assert text_encoder_names([False]) == ["text_encoder"]
    assert text_encoder_names([False, True]) == ["text_encoder", "text_encoder_2"]
    assert text_encoder_names([True]) == ["text_encoder_2"]  # the refiner's lone bigG


def test_sd_config_is_one_text_embedder_dropped_to_the_empty_prompt(encoders):
    """SD 1/2 keep cond_stage_config + text_drop_rate: one embedder, null = encoding of "", the same draws."""
    first, _ = encoders
    cfg = build_config({"model": {"text_drop_rate": 0.5, "unet_config": {"context_dim": TEXT_DIM},
                                  "cond_stage_config": {"kind": "clip"}}}).model  # fmt: skip
    conditioner = build_conditioner(cfg, [lambda: first])
    (embedder,) = conditioner.embedders
    assert isinstance(embedder, TextEmbedder) and embedder.null == "empty_prompt" and embedder.drop_rate == 0.5
    prompts = ["red"] * 6
    cond = conditioner({"captions": prompts}, torch.Generator().manual_seed(1), "cpu")
    keep = torch.rand(6, generator=torch.Generator().manual_seed(1)) >= 0.5
    expected = torch.where(keep.view(-1, 1, 1), first.encode(prompts).embeddings, first.encode([""]).embeddings)
    assert set(cond) == {"context"} and torch.equal(cond["context"], expected)
    assert Conditioner([TextEmbedder(lambda: first)]).prompts(prompts, "cpu")["context"].equal(
        first.encode(prompts).embeddings
    )


def test_size_embedder_reads_scalars_and_pairs():
    from t2i.models.layers import size_embedding

    scores = SizeEmbedder("aesthetic_score", 8).encode_batch({"aesthetic_score": torch.tensor([6.0, 2.5])}, "cpu")
    assert torch.equal(scores["y"], size_embedding(torch.tensor([[6.0], [2.5]]), 8))
    pairs = SizeEmbedder("original_size_as_tuple", 4).encode_batch({"original_size_as_tuple": [(8, 16)]}, "cpu")
    assert pairs["y"].shape == (1, 8)


# ---------------------------------------------------------------------------------------------------- config


def test_bundled_sdxl_configs_define_the_conditioner():
    base = load_config("sdxl").model
    kinds = [(e.input_key, e.emb_model.kind) for e in base.embedders()]
    assert kinds == [("captions", "clip"), ("captions", "openclip"), *((k, "size") for k in SIZE_KEYS)]
    assert [e.emb_model.always_return_pooled for e in base.embedders()[:2]] == [False, True]
    assert {e.emb_model.layer for e in base.embedders()[:2]} == {"penultimate_hidden"}
    refiner = load_config("sdxl-refiner").model.embedders()
    assert [e.input_key for e in refiner] == ["captions", "original_size_as_tuple", "crop_coords_top_left",
                                              "aesthetic_score"]  # fmt: skip
    printed = to_yaml(load_config("sdxl"))
    for key in ("conditioner_config:", "emb_models:", "ucg_rate:", "legacy_ucg_value:", "always_return_pooled:",
                "outdim: 256"):  # fmt: skip
        assert key in printed


def test_list_items_take_dotted_overrides():
    cfg = load_config("sdxl", ["model.conditioner_config.emb_models.1.ucg_rate=0.25",
                               "model.conditioner_config.emb_models.0.emb_model.path=/tok"]).model  # fmt: skip
    assert cfg.embedders()[1].ucg_rate == 0.25 and cfg.embedders()[0].emb_model.path == "/tok"
    assert cfg.embedders()[0].ucg_rate == 0.1 and cfg.embedders()[1].emb_model.arch == "ViT-bigG-14"
    with pytest.raises(ConfigError, match=r"emb_models\.9: index out of range"):
        load_config("sdxl", ["model.conditioner_config.emb_models.9.ucg_rate=0"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"conditioner_config.emb_models.2.input_key": "captions"}, r"emb_models\[2\]\.input_key"),
        ({"conditioner_config.emb_models.0.input_key": "aesthetic_score"}, r"emb_models\[0\]\.input_key"),
        ({"conditioner_config.emb_models.0.legacy_ucg_value": "x"}, "legacy_ucg_value"),
        ({"conditioner_config.emb_models.0.ucg_rate": 2.0}, "ucg_rate"),
        ({"conditioner_config.emb_models.2.emb_model": {"kind": "fourier"}}, "is not one of"),
        ({"conditioner_config.emb_models.2.emb_model": {"kind": "size", "outdim": 7}}, "outdim"),
    ],
)
def test_bad_conditioner_config_is_a_config_error(change, message):
    with pytest.raises(ConfigError, match=message):
        sdxl_model_config(**change)
