"""t2i AutoencoderKL -> diffusers format, checked by running diffusers' own AutoencoderKL on the result."""

from __future__ import annotations

import pytest
import torch

from t2i.convert.vae_diffusers import (
    config_from_diffusers,
    config_to_diffusers,
    save_diffusers_vae,
    state_dict_from_diffusers,
    state_dict_to_diffusers,
)
from t2i.errors import ConfigError
from t2i.models.autoencoder import AutoencoderKL

diffusers = pytest.importorskip("diffusers")

TINY = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 32,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [16],
    "dropout": 0.0,
}


def random_ours() -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(4, TINY, scale_factor=0.13)
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, 0.05 if p.ndim > 1 else 0.2)
    return vae.eval()


def test_ours_to_diffusers_model_gives_same_outputs():
    ours = random_ours()
    config = config_to_diffusers(ours.config_dict())
    config.pop("_class_name")
    reference = diffusers.AutoencoderKL(**config).eval()
    reference.load_state_dict(state_dict_to_diffusers(ours.state_dict()), strict=True)

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        theirs = reference.encode(x).latent_dist
        posterior = ours.encode(x)
        torch.testing.assert_close(theirs.mean, posterior.mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(theirs.logvar, posterior.logvar, atol=1e-4, rtol=0)
        torch.testing.assert_close(reference.decode(z).sample, ours.decode(z), atol=1e-4, rtol=0)


def test_saved_folder_loads_in_diffusers(tmp_path):
    ours = random_ours()
    save_diffusers_vae(ours, str(tmp_path / "vae"))
    reference = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert reference.config.scaling_factor == pytest.approx(0.13)
    assert list(reference.config.down_block_types) == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(reference.decode(z).sample, ours.decode(z), atol=1e-4, rtol=0)


def test_state_dict_and_config_roundtrip_exactly():
    ours = random_ours()
    state = ours.state_dict()
    back = state_dict_from_diffusers(state_dict_to_diffusers(state))
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    config = config_from_diffusers(config_to_diffusers(ours.config_dict()))
    assert config["ddconfig"] == ours.ddconfig and config["embed_dim"] == 4


def test_old_diffusers_attention_names_are_read():
    ours = random_ours()
    new_names = state_dict_to_diffusers(ours.state_dict())
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old_names = {}
    for key, value in new_names.items():
        for new, old in renames.items():
            key = key.replace(f".{new}.", f".{old}.")
        old_names[key] = value
    assert any(".query." in k for k in old_names)
    back = state_dict_from_diffusers(old_names)
    assert set(back) == set(ours.state_dict())


def test_unsupported_diffusers_configs_raise():
    with pytest.raises(ConfigError, match="norm_num_groups: 16 must divide every level width"):
        AutoencoderKL.from_config(config_from_diffusers({"block_out_channels": [24, 48], "norm_num_groups": 16}))
    with pytest.raises(ConfigError, match="down_block_types"):
        config_from_diffusers({"block_out_channels": [32], "down_block_types": ["Foo"]})
    with pytest.raises(ConfigError, match="embed_dim"):
        config_to_diffusers({"embed_dim": 3, "ddconfig": TINY})


def test_flux_style_vae_saves_back_to_diffusers(tmp_path):
    torch.manual_seed(6)
    ddconfig = {**TINY, "ch": 8, "z_channels": 16, "norm_num_groups": 2, "attn_resolutions": []}
    ours = AutoencoderKL(
        16, ddconfig, use_quant_conv=False, use_post_quant_conv=False, scale_factor=0.3611, shift_factor=0.1159
    ).eval()
    save_diffusers_vae(ours, str(tmp_path / "vae"))
    reference = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    cfg = reference.config
    assert (cfg.norm_num_groups, cfg.latent_channels, cfg.use_quant_conv, cfg.use_post_quant_conv) == (2, 16, False, False)
    assert (cfg.shift_factor, cfg.scaling_factor) == (pytest.approx(0.1159), pytest.approx(0.3611))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    z = torch.randn(1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(reference.encode(x).latent_dist.mean, ours.encode(x).mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(reference.decode(z).sample, ours.decode(z), atol=1e-5, rtol=0)
    back = config_from_diffusers(config_to_diffusers(ours.config_dict()))
    assert back["ddconfig"] == ours.ddconfig and back["shift_factor"] == pytest.approx(0.1159)


def test_flux_vae_preset_is_diffusers_flux_vae():
    """FLUX.1's vae/config.json values (diffusers) build the same tensors as our FLUX_VAE preset."""
    from t2i.models.autoencoder import FLUX_VAE

    flux_config = {
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 16,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
        "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True,
    }
    assert config_from_diffusers(flux_config) == {**FLUX_VAE, "mid_attention": True}
    with torch.device("meta"):
        ours = AutoencoderKL.from_config(FLUX_VAE)
        theirs = diffusers.AutoencoderKL(**flux_config)
    converted = state_dict_to_diffusers(ours.state_dict())
    reference = theirs.state_dict()
    assert set(converted) == set(reference)
    assert all(converted[k].shape == reference[k].shape for k in reference)
    assert sum(p.numel() for p in ours.parameters()) == 83_819_683
