"""Noise-conditioning augmentation of the low-res input, checked against the EDM and log-SNR formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from t2i.diffusion.noise_aug import augment_low_res, fixed_augment, sample_aug_levels, upsample_low_res
from t2i.diffusion.schedules import LogSNRSchedule
from t2i.errors import ConfigError, InvalidInputError

LINEAR = LogSNRSchedule("linear")


def low_res(batch: int = 4, size: int = 32) -> torch.Tensor:
    return (
        torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
        - 1
    )


def edm_c_in(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    return 1 / (sigma.double() ** 2 + sigma_data**2).sqrt().reshape(-1, 1, 1, 1)


def test_fixed_edm_level_0002_changes_the_image_by_0002_std():
    x = low_res()
    x_aug, aug_cond = fixed_augment(x, 0.002, "EDM", torch.Generator().manual_seed(1))
    sigma = torch.full((4,), 0.002)
    difference = x_aug / edm_c_in(sigma) - x
    assert difference.std().item() == pytest.approx(0.002, rel=0.05)
    assert difference.mean().abs().item() < 2e-4
    torch.testing.assert_close(aug_cond, torch.full((4,), math.log(0.002) / 4))
    default_x, default_cond = fixed_augment(x, None, "EDM", torch.Generator().manual_seed(1))
    torch.testing.assert_close(default_x, x_aug)
    torch.testing.assert_close(default_cond, aug_cond)


def test_edm_training_levels_are_per_sample_and_encoded_as_c_noise():
    x = low_res(6, 64)
    x_aug, aug_cond = augment_low_res(x, "EDM", torch.Generator().manual_seed(2), per_sample=True)
    sigma = (4 * aug_cond.double()).exp()
    assert len(set(aug_cond.tolist())) == 6
    measured = (x_aug / edm_c_in(sigma) - x).flatten(1).std(dim=1)
    torch.testing.assert_close(measured, sigma, rtol=0.05, atol=0)


def test_per_batch_mode_uses_one_level():
    _, aug_cond = augment_low_res(low_res(), "EDM", torch.Generator().manual_seed(3), per_sample=False)
    assert aug_cond.shape == (4,) and len(set(aug_cond.tolist())) == 1
    _, t_cond = augment_low_res(
        low_res(), "DDPM", torch.Generator().manual_seed(3), per_sample=False, time_cond="t"
    )
    assert len(set(t_cond.tolist())) == 1


def test_edm_levels_follow_the_training_lognormal():
    sigma = sample_aug_levels(20000, "EDM", torch.Generator().manual_seed(4), p_mean=-1.2, p_std=1.2)
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.03)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.03)


def test_ddpm_levels_are_uniform_and_noise_with_the_log_snr():
    t = sample_aug_levels(20000, "DDPM", torch.Generator().manual_seed(5), max_level=0.5)
    assert 0 <= t.min() and t.max() < 0.5 and t.mean().item() == pytest.approx(0.25, abs=0.01)

    x = low_res(4, 64)
    x_aug, t_aug = augment_low_res(
        x, "DDPM", torch.Generator().manual_seed(6), noise_schedule=LINEAR, max_level=1.0, time_cond="t"
    )
    logsnr = -torch.log(torch.expm1(1e-4 + 10 * t_aug.double() ** 2))
    alpha, sigma_vp = logsnr.sigmoid().sqrt(), (-logsnr).sigmoid().sqrt()
    residual = x_aug - alpha.reshape(-1, 1, 1, 1) * x
    torch.testing.assert_close(residual.flatten(1).std(dim=1), sigma_vp, rtol=0.05, atol=0)
    _, logsnr_cond = augment_low_res(x, "DDPM", torch.Generator().manual_seed(6), noise_schedule=LINEAR)
    torch.testing.assert_close(logsnr_cond.double(), logsnr, rtol=1e-5, atol=1e-5)


def test_fixed_ddpm_level_zero_is_the_schedule_floor():
    x = low_res()
    x_aug, cond = fixed_augment(x, 0.0, "DDPM", torch.Generator().manual_seed(7), noise_schedule=LogSNRSchedule("cosine"))
    expected = -math.log(math.cos(0.008 / 1.008 * math.pi / 2) ** -2 - 1)
    torch.testing.assert_close(cond, torch.full((4,), expected, dtype=torch.float32), rtol=1e-4, atol=0)
    assert (x_aug - x).abs().max() < 0.1


def test_same_generator_reproduces():
    a = augment_low_res(low_res(), "EDM", torch.Generator().manual_seed(8))
    b = augment_low_res(low_res(), "EDM", torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_levels_and_kind():
    with pytest.raises(InvalidInputError, match="aug_level"):
        fixed_augment(low_res(), 0.0, "EDM")
    with pytest.raises(InvalidInputError, match="aug_level"):
        fixed_augment(low_res(), 2.0, "DDPM")
    with pytest.raises(ConfigError, match="preconditioning_type"):
        fixed_augment(low_res(), 0.1, "flow")


def test_upsample_is_bicubic_and_clamped():
    x = low_res(2, 8).float()
    checker = torch.ones(1, 1, 8, 8)
    checker[..., ::2, 1::2] = -1
    checker[..., 1::2, ::2] = -1
    up = upsample_low_res(checker, 32)
    assert up.shape == (1, 1, 32, 32) and up.abs().max() <= 1.0
    assert F.interpolate(checker, size=(32, 32), mode="bicubic").abs().max() > 1.0  # what the clamp removes
    torch.testing.assert_close(
        upsample_low_res(x, (16, 24)),
        F.interpolate(x, size=(16, 24), mode="bicubic", align_corners=False).clamp(-1, 1),
    )
    torch.testing.assert_close(
        upsample_low_res(torch.full((1, 3, 4, 4), 0.3), 16), torch.full((1, 3, 16, 16), 0.3)
    )


# ------------------------------------------------------------------ end to end on a tiny super-resolution UNet


@pytest.fixture
def single_thread():
    """Tiny models run much faster on one thread when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_sr_unet() -> torch.nn.Module:
    from t2i.models.imagen_unet import build_imagen_unet

    torch.manual_seed(0)
    unet = build_imagen_unet(
        "sr-unet",
        {"embed_dim": 16, "image_size": 16, "channels": 3, "text_embed_dim": 8, "num_res_blocks": [1, 1],
         "channel_mult": [1, 2], "per_head_channels": 8, "cond_dim": 16, "attention_type": "fused",
         "learned_sinu_pos_emb_dim": 0, "attention_resolutions": [8], "noise_cond_aug": True},
    )  # fmt: skip
    with torch.no_grad():  # random output projection, so the prediction is not identically zero
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return unet


@pytest.mark.parametrize("kind", ["EDM", "DDPM"])
def test_sr_stage_trains_and_samples_with_augmented_low_res(kind, single_thread):
    """An SR stage end to end: augmented x_low_res + aug_cond through the loss (finite gradients), then sampling
    with the fixed level under dynamic thresholding, whose last step returns the thresholded x0 in [-1, 1]."""
    from t2i.diffusion.denoisers import ContinuousDDPMDenoiser, EDMDenoiser
    from t2i.diffusion.losses import ContinuousDDPMLoss, EDMLoss
    from t2i.diffusion.samplers import get_sampler
    from t2i.diffusion.schedules import continuous_sigmas, edm_sigmas
    from t2i.diffusion.thresholding import DynamicThresholding

    unet = tiny_sr_unet()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    text = {
        "text_embed": torch.randn(2, 4, 8, generator=gen),
        "text_mask": torch.ones(2, 4, dtype=torch.bool),
    }
    x_low = F.interpolate(images, size=(8, 8), mode="area")
    x_aug, aug_cond = augment_low_res(x_low, kind, gen, noise_schedule=LINEAR)
    cond = {**text, "x_low_res": x_aug, "aug_cond": aug_cond}
    if kind == "EDM":
        denoiser, sigmas, sampler = EDMDenoiser(unet), edm_sigmas(3), "heun"
        losses = EDMLoss()(denoiser, images, cond, gen)
    else:
        denoiser, sigmas, sampler = ContinuousDDPMDenoiser(unet, LINEAR), continuous_sigmas(3, LINEAR), "ddpm_continuous"
        losses = ContinuousDDPMLoss()(denoiser, images, cond, gen)
    losses.mean().backward()
    grads = [p.grad for p in unet.parameters() if p.grad is not None]
    assert losses.shape == (2,) and grads and all(torch.isfinite(g).all() for g in grads)

    x_fixed, fixed_cond = fixed_augment(x_low, None, kind, gen, noise_schedule=LINEAR)
    thresholded = DynamicThresholding(denoiser, percentile=0.9)
    noise = torch.randn(2, 3, 16, 16, generator=gen) * float(sigmas[0])
    with torch.no_grad():
        out = get_sampler(sampler)(
            thresholded, noise, sigmas, {**text, "x_low_res": x_fixed, "aug_cond": fixed_cond}, generator=gen
        )
    assert out.shape == images.shape and torch.isfinite(out).all() and out.abs().max() <= 1.0 + 1e-6
