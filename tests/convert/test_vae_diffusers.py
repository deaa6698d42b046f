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
    with pytest.raises(ConfigError, match="norm_num_groups"):
        config_from_diffusers({"block_out_channels": [32], "norm_num_groups": 16})
    with pytest.raises(ConfigError, match="down_block_types"):
        config_from_diffusers({"block_out_channels": [32], "down_block_types": ["Foo"]})
    with pytest.raises(ConfigError, match="embed_dim"):
        config_to_diffusers({"embed_dim": 3, "ddconfig": TINY})
