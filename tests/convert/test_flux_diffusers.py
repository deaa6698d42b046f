"""Flux weights and configs against diffusers' FluxTransformer2DModel (the reference) on the same random
weights: folders both ways (single and sharded safetensors), outputs at the token and latent levels, the key
map's round trip, BFL/ComfyUI single files and mismatch errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from flux_helpers import TINY

from t2i.convert.flux_diffusers import (
    WEIGHTS_INDEX_NAME,
    flux_config_from_diffusers,
    flux_config_to_diffusers,
    flux_state_dict_from_diffusers,
    flux_state_dict_to_diffusers,
    load_flux_transformer,
    save_flux_single_file,
    save_flux_transformer_as_diffusers,
)
from t2i.errors import ConfigError, PipelineLoadError, WeightsMismatchError
from t2i.models.flux import FluxTransformer, image_position_ids, pack_latents, unpack_latents

diffusers = pytest.importorskip("diffusers")

TOLERANCE = 1e-5  # float32; the measured max difference is 0 (the same operations in the same order)


def tiny_diffusers(guidance: bool, seed: int = 0):
    """The diffusers twin of flux_helpers.TINY."""
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=32,
        pooled_projection_dim=24,
        guidance_embeds=guidance,
        axes_dims_rope=[4, 6, 6],
    )
    with torch.no_grad():  # random values everywhere, so a swapped or misplaced tensor cannot go unnoticed
        for p in model.parameters():
            p.normal_(0.0, 0.1 if p.ndim > 1 else 0.3)
    return model.eval()


def batch(guidance: bool, size: int = 2, tokens: int = 7, rows: int = 4, cols: int = 6):
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(size, 4, 2 * rows, 2 * cols, generator=g),
        "context": torch.randn(size, tokens, 32, generator=g),
        "pooled": torch.randn(size, 24, generator=g),
        "t": torch.rand(size, generator=g),
        "guidance": torch.tensor([3.5, 1.0])[:size] if guidance else None,
        "rows": rows,
        "cols": cols,
    }


def diffusers_tokens(model, b) -> torch.Tensor:
    """What FluxPipeline does: pack 2x2, ids (0, row, col) for the image and zeros for the text."""
    img_ids = image_position_ids(1, b["rows"], b["cols"])[0]
    txt_ids = torch.zeros(b["context"].shape[1], 3)
    with torch.no_grad():
        return model(
            pack_latents(b["x"]),
            b["context"],
            b["pooled"],
            b["t"],
            img_ids,
            txt_ids,
            guidance=b["guidance"],
            return_dict=False,
        )[0]


def our_tokens(model: FluxTransformer, b) -> torch.Tensor:
    n = b["x"].shape[0]
    img_ids = image_position_ids(n, b["rows"], b["cols"])
    txt_ids = torch.zeros(n, b["context"].shape[1], 3)
    with torch.no_grad():
        return model.forward_tokens(
            pack_latents(b["x"]), img_ids, b["context"], txt_ids, b["t"], b["pooled"], b["guidance"]
        )


@pytest.mark.parametrize("guidance", [True, False])
def test_diffusers_folder_loads_and_matches_at_both_levels(tmp_path, guidance):
    reference = tiny_diffusers(guidance)
    reference.save_pretrained(tmp_path / "transformer")
    ours = load_flux_transformer(tmp_path / "transformer")
    assert ours.flux_config["guidance_embed"] is guidance and ours.latent_channels == 4
    b = batch(guidance)
    theirs = diffusers_tokens(reference, b)
    torch.testing.assert_close(our_tokens(ours, b), theirs, atol=TOLERANCE, rtol=0)
    with torch.no_grad():
        latent = ours(b["x"], b["t"], b["context"], b["pooled"], b["guidance"])
    torch.testing.assert_close(latent, unpack_latents(theirs, 8, 12), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(("guidance", "shard"), [(True, None), (False, 40_000)])
def test_saved_folder_loads_in_diffusers_with_the_same_outputs(tmp_path, guidance, shard):
    reference = tiny_diffusers(guidance, seed=3)
    reference.save_pretrained(tmp_path / "in")
    ours = load_flux_transformer(tmp_path / "in")
    save_flux_transformer_as_diffusers(ours, tmp_path / "out", max_shard_bytes=shard)
    assert (tmp_path / "out" / WEIGHTS_INDEX_NAME).is_file() is (shard is not None)
    reloaded = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    b = batch(guidance)
    torch.testing.assert_close(diffusers_tokens(reloaded, b), diffusers_tokens(reference, b), atol=0, rtol=0)
    again = load_flux_transformer(tmp_path / "out")  # our loader reads the shards back too
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def test_sharded_diffusers_folder_loads(tmp_path):
    reference = tiny_diffusers(True)
    reference.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="50KB")
    assert (tmp_path / "pipe" / "transformer" / WEIGHTS_INDEX_NAME).is_file()
    ours = load_flux_transformer(tmp_path / "pipe")  # a pipeline root: its transformer/ is found
    b = batch(True)
    torch.testing.assert_close(our_tokens(ours, b), diffusers_tokens(reference, b), atol=TOLERANCE, rtol=0)


def test_key_map_round_trips_and_swaps_the_final_modulation():
    reference = tiny_diffusers(True)
    config = flux_config_from_diffusers(dict(reference.config))
    theirs = reference.state_dict()
    ours = flux_state_dict_from_diffusers(theirs, config)
    assert set(ours) == set(FluxTransformer(**config).state_dict())
    back = flux_state_dict_to_diffusers(ours, config)
    assert set(back) == set(theirs) and all(torch.equal(back[k], theirs[k]) for k in theirs)
    # BFL splits the final modulation (shift, scale); diffusers (scale, shift).
    hidden = config["hidden_size"]
    final = ours["final_layer.adaLN_modulation.1.weight"]
    assert torch.equal(final[:hidden], theirs["norm_out.linear.weight"][hidden:])
    qkv = ours["single_blocks.1.linear1.weight"]
    assert torch.equal(qkv[2 * hidden : 3 * hidden], theirs["single_transformer_blocks.1.attn.to_v.weight"])
    assert torch.equal(qkv[3 * hidden :], theirs["single_transformer_blocks.1.proj_mlp.weight"])


def test_config_round_trips_and_names_what_diffusers_cannot_hold():
    reference = tiny_diffusers(False)
    config = flux_config_from_diffusers(dict(reference.config))
    assert config == {**TINY, "guidance_embed": False}
    assert flux_config_from_diffusers(flux_config_to_diffusers(config)) == config
    with pytest.raises(ConfigError, match="qkv_bias"):
        flux_config_to_diffusers({**config, "qkv_bias": False})
    with pytest.raises(ConfigError, match="patch_size"):
        flux_config_from_diffusers({**dict(reference.config), "patch_size": 2})


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_and_comfyui_single_files_load(tmp_path, prefix):
    reference = tiny_diffusers(True)
    config = flux_config_from_diffusers(dict(reference.config))
    state = flux_state_dict_from_diffusers(reference.state_dict(), config)
    file = {f"{prefix}{k}": v.contiguous() for k, v in state.items()}
    if prefix:  # a ComfyUI checkpoint also carries the VAE and text encoders; they are not ours to load
        file["vae.decoder.conv_in.weight"] = torch.zeros(1)
        file["text_encoders.clip_l.logit_scale"] = torch.zeros(1)
    save_file(file, tmp_path / "flux.safetensors")
    ours = load_flux_transformer(tmp_path / "flux.safetensors", config={**config})
    b = batch(True)
    torch.testing.assert_close(our_tokens(ours, b), diffusers_tokens(reference, b), atol=TOLERANCE, rtol=0)
    if not prefix:
        # without a config, everything but the RoPE split is read from the shapes
        with pytest.raises(ConfigError, match="axes_dim: required for a head dim of 16"):
            load_flux_transformer(tmp_path / "flux.safetensors")
        save_flux_single_file(ours, tmp_path / "again.safetensors")
        again = load_flux_transformer(tmp_path / "again.safetensors", config=config)
        assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), again.parameters(), strict=True))


def test_config_is_inferred_from_flux1_shaped_weights():
    from t2i.convert.flux_diffusers import flux_config_from_state_dict
    from t2i.models.flux import FLUX_DEV

    with torch.device("meta"):
        state = FluxTransformer(**FLUX_DEV).state_dict()
    assert flux_config_from_state_dict(state) == FLUX_DEV


def test_mismatched_weights_and_paths_raise_one_line_errors(tmp_path):
    reference = tiny_diffusers(True)
    config = flux_config_from_diffusers(dict(reference.config))
    theirs = reference.state_dict()
    theirs["transformer_blocks.0.attn.extra.weight"] = torch.zeros(1)
    del theirs["proj_out.bias"]
    with pytest.raises(
        WeightsMismatchError,
        match=r"missing \['proj_out.bias'\].*unexpected \['transformer_blocks.0.attn.extra",
    ):
        flux_state_dict_from_diffusers(theirs, config)
    schnell_config = {**config, "guidance_embed": False}
    with pytest.raises(WeightsMismatchError, match="guidance_in"):
        flux_state_dict_to_diffusers(FluxTransformer(**config).state_dict(), schnell_config)
    with pytest.raises(PipelineLoadError, match="nowhere"):
        load_flux_transformer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(dict(reference.config)))
    with pytest.raises(PipelineLoadError, match="no diffusion_pytorch_model.safetensors"):
        load_flux_transformer(tmp_path / "empty")
    save_file({"weird.prefix.img_in.weight": torch.zeros(1)}, tmp_path / "odd.safetensors")
    with pytest.raises(WeightsMismatchError, match="unknown prefix 'weird.prefix.'"):
        load_flux_transformer(tmp_path / "odd.safetensors")
