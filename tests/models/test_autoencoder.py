"""AutoencoderKL against diffusers' AutoencoderKL (same random weights) and the SD VAE parameter count."""

from __future__ import annotations

import json

import pytest
import torch

from t2i.convert.vae_diffusers import load_vae, state_dict_from_diffusers
from t2i.errors import ConfigError, PipelineLoadError
from t2i.models.autoencoder import AutoencoderKL, DiagonalGaussian, count_parameters
from t2i.models.first_stage import IdentityFirstStage, LatentFirstStage

diffusers = pytest.importorskip("diffusers")

SD_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}

TINY_DDCONFIG = {**SD_DDCONFIG, "resolution": 32, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1}


def tiny_diffusers_vae(attention_level: bool = False):
    torch.manual_seed(0)
    down = ["DownEncoderBlock2D", "AttnDownEncoderBlock2D" if attention_level else "DownEncoderBlock2D"]
    up = ["AttnUpDecoderBlock2D" if attention_level else "UpDecoderBlock2D", "UpDecoderBlock2D"]
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=1,
        norm_num_groups=32,
        latent_channels=4,
        sample_size=32,
    )
    # Random (not default-init) values everywhere, so a swapped or transposed tensor cannot go unnoticed.
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, 0.05 if p.ndim > 1 else 0.2)
    return vae.eval()


def test_sd_vae_parameter_count_on_meta():
    with torch.device("meta"):
        vae = AutoencoderKL(4, SD_DDCONFIG)
    assert count_parameters(vae) == 83_653_863


@pytest.mark.parametrize("attention_level", [False, True])
def test_loads_diffusers_folder_and_matches_outputs(tmp_path, attention_level):
    reference = tiny_diffusers_vae(attention_level)
    reference.save_pretrained(tmp_path / "vae")
    ours = load_vae(tmp_path / "vae").eval()
    assert ours.ddconfig["attn_resolutions"] == ([16] if attention_level else [])
    assert ours.scale_factor == pytest.approx(0.18215)

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        theirs = reference.encode(x).latent_dist
        posterior = ours.encode(x)
        torch.testing.assert_close(posterior.mean, theirs.mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(posterior.logvar, theirs.logvar, atol=1e-4, rtol=0)
        z = torch.randn(2, 4, 16, 16)
        torch.testing.assert_close(ours.decode(z), reference.decode(z).sample, atol=1e-4, rtol=0)


def test_pipeline_root_with_vae_subfolder_loads(tmp_path):
    tiny_diffusers_vae().save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert load_vae(tmp_path / "pipe").downsample_factor == 2
    with pytest.raises(PipelineLoadError, match="a diffusers VAE folder; load it with .*load_vae"):
        AutoencoderKL.from_pretrained(tmp_path / "pipe")


def test_t2i_folder_roundtrip(tmp_path):
    torch.manual_seed(1)
    vae = AutoencoderKL(4, TINY_DDCONFIG, scale_factor=0.5).eval()
    vae.save_pretrained(tmp_path / "ours")
    assert "_class_name" not in json.loads((tmp_path / "ours" / "config.json").read_text())
    loaded = AutoencoderKL.from_pretrained(tmp_path / "ours").eval()
    assert torch.equal(load_vae(tmp_path / "ours").decoder.conv_out.weight, loaded.decoder.conv_out.weight)
    assert loaded.scale_factor == 0.5
    for (k1, v1), (k2, v2) in zip(vae.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def test_compvis_key_names():
    keys = set(AutoencoderKL(4, TINY_DDCONFIG).state_dict())
    for key in (
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.conv1.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.mid.attn_1.q.weight",
        "encoder.mid.block_2.norm2.bias",
        "encoder.norm_out.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.up.0.block.1.conv2.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",
        "decoder.mid.attn_1.proj_out.weight",
    ):
        assert key in keys, key
    assert "encoder.down.1.downsample.conv.weight" not in keys


def test_diagonal_gaussian_matches_closed_form():
    mean = torch.randn(2, 4, 3, 3)
    logvar = torch.randn(2, 4, 3, 3) * 40  # exercises the [-30, 20] clamp
    dist = DiagonalGaussian(mean, logvar)
    clamped = logvar.clamp(-30, 20)
    assert torch.equal(dist.logvar, clamped)
    expected_kl = 0.5 * (mean**2 + clamped.exp() - 1 - clamped).sum(dim=(1, 2, 3))
    torch.testing.assert_close(dist.kl(), expected_kl)
    a = dist.sample(torch.Generator().manual_seed(3))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, mean + torch.exp(0.5 * clamped) * eps)
    assert torch.equal(dist.mode(), mean)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(2)
    vae = AutoencoderKL(4, {**TINY_DDCONFIG, "attn_resolutions": [16]})
    x = torch.randn(1, 3, 32, 32)

    def grads(flag: bool) -> list[torch.Tensor]:
        vae.zero_grad()
        vae.set_gradient_checkpointing(flag)
        recon, _ = vae(x, sample_posterior=False)
        recon.square().mean().backward()
        return [p.grad.clone() for p in vae.parameters()]

    for g1, g2 in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_bad_ddconfig_and_missing_folder_raise(tmp_path):
    with pytest.raises(ConfigError, match="ddconfig.chmult"):
        AutoencoderKL(4, {**TINY_DDCONFIG, "chmult": [1]})
    with pytest.raises(PipelineLoadError, match="nowhere"):
        AutoencoderKL.from_pretrained(tmp_path / "nowhere")


def test_latent_first_stage_scales_and_identity_is_identity():
    torch.manual_seed(4)
    vae = AutoencoderKL(4, TINY_DDCONFIG)
    stage = LatentFirstStage(vae, scale_factor=0.25)
    assert stage.downsample_factor == 2 and stage.latent_channels == 4
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, _ = stage.encode_moments(images)
    with torch.no_grad():
        posterior = vae.encode(images)
    torch.testing.assert_close(mean, posterior.mean)
    z = stage.encode(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, posterior.sample(torch.Generator().manual_seed(0)) * 0.25)
    with torch.no_grad():
        torch.testing.assert_close(stage.decode(z), vae.decode(z / 0.25))
    assert not any(p.requires_grad for p in stage.parameters())

    ident = IdentityFirstStage()
    assert ident.downsample_factor == 1 and ident.latent_channels == 3
    m, lv = ident.encode_moments(images)
    assert torch.equal(ident.z_from_moments(m, lv, None), images)
    assert torch.equal(ident.decode(ident.encode(images)), images)


def tiny_flux_style_vae():
    """A diffusers AutoencoderKL shaped like FLUX.1's: 16 latent channels, no quant convs, a shift factor;
    2 GroupNorm groups, as diffusers' own tiny test VAEs use."""
    torch.manual_seed(5)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        layers_per_block=1,
        norm_num_groups=2,
        latent_channels=16,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, 0.05 if p.ndim > 1 else 0.2)
    return vae.eval()


def test_flux_style_diffusers_vae_loads_with_parity(tmp_path):
    reference = tiny_flux_style_vae()
    reference.save_pretrained(tmp_path / "vae")
    ours = load_vae(tmp_path / "vae").eval()
    assert ours.quant_conv is None and ours.post_quant_conv is None
    assert ours.ddconfig["norm_num_groups"] == 2 and ours.encoder.norm_out.num_groups == 2
    assert (ours.scale_factor, ours.shift_factor) == (pytest.approx(0.3611), pytest.approx(0.1159))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        theirs = reference.encode(x).latent_dist
        posterior = ours.encode(x)
        torch.testing.assert_close(posterior.mean, theirs.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(posterior.logvar, theirs.logvar, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.decode(z), reference.decode(z).sample, atol=1e-5, rtol=0)


def test_latent_first_stage_shift_follows_diffusers_convention():
    """diffusers' Flux pipelines: latents = (z - shift) * scale to diffuse, z = latents / scale + shift to decode."""
    reference = tiny_flux_style_vae()
    vae = AutoencoderKL.from_config(
        {"embed_dim": 16, "ddconfig": {**TINY_DDCONFIG, "ch": 8, "z_channels": 16, "norm_num_groups": 2},
         "use_quant_conv": False, "use_post_quant_conv": False}
    )
    vae.load_state_dict(state_dict_from_diffusers(reference.state_dict()))
    stage = LatentFirstStage(vae, scale_factor=0.3611, shift_factor=0.1159)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = reference.encode(images).latent_dist
        expected = (dist.sample(torch.Generator().manual_seed(0)) - 0.1159) * 0.3611
        latents = stage.encode(images, torch.Generator().manual_seed(0))
        torch.testing.assert_close(latents, expected, atol=1e-5, rtol=0)
        decoded = reference.decode(latents / 0.3611 + 0.1159).sample
        torch.testing.assert_close(stage.decode(latents), decoded, atol=1e-5, rtol=0)
    unshifted = LatentFirstStage(vae, scale_factor=0.3611)
    mean, logvar = unshifted.encode_moments(images)
    torch.testing.assert_close(
        unshifted.z_from_moments(mean, logvar, torch.Generator().manual_seed(1)),
        DiagonalGaussian(mean, logvar).sample(torch.Generator().manual_seed(1)) * 0.3611,
        atol=0, rtol=0,
    )


def test_quant_conv_free_vae_needs_embed_dim_equal_z_channels():
    with pytest.raises(ConfigError, match="embed_dim: 8 must equal ddconfig.z_channels"):
        AutoencoderKL(8, TINY_DDCONFIG, use_quant_conv=False)
