"""Training objective: targets against diffusers' DDPMScheduler, Min-SNR weights against the closed form."""

from __future__ import annotations

import pytest
import torch

from t2i.diffusion.objectives import (
    DiffusionObjective,
    min_snr_weight,
    q_sample,
    sample_noise,
    snr,
    training_target,
    velocity,
)
from t2i.diffusion.schedules import make_alphas_cumprod
from t2i.errors import ConfigError


@pytest.fixture()
def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         num_train_timesteps=1000)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 4, 8, 8, generator=g)
    noise = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    return x0, noise, t


def test_q_sample_and_velocity_match_diffusers(scheduler):
    x0, noise, t = _inputs()
    ac = make_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012)
    torch.testing.assert_close(q_sample(x0, noise, ac, t), scheduler.add_noise(x0, noise, t))
    torch.testing.assert_close(velocity(x0, noise, ac, t), scheduler.get_velocity(x0, noise, t))


@pytest.mark.parametrize("param", ["eps", "epsilon", "v", "x0"])
def test_targets_match_diffusers(scheduler, param):
    x0, noise, t = _inputs(1)
    ac = scheduler.alphas_cumprod
    expected = {"eps": noise, "epsilon": noise, "v": scheduler.get_velocity(x0, noise, t), "x0": x0}[param]
    torch.testing.assert_close(training_target(param, x0, noise, ac, t), expected)


def test_min_snr_weights_closed_form():
    ac = make_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012)
    t = torch.arange(0, 1000, 37)
    s = (ac[t] / (1 - ac[t])).double()
    gamma = 5.0
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    torch.testing.assert_close(snr(ac, t).double(), s, rtol=1e-5, atol=0)
    torch.testing.assert_close(min_snr_weight(snr(ac, t), gamma, "eps").double(), clipped / s, rtol=1e-5, atol=0)
    torch.testing.assert_close(min_snr_weight(snr(ac, t), gamma, "v").double(), clipped / (s + 1), rtol=1e-5, atol=0)
    # Early (clean) steps are down-weighted, noisy steps keep weight 1 for eps.
    w = min_snr_weight(snr(ac, t), gamma, "eps")
    assert w[0] < 0.01 and torch.allclose(w[-1], torch.tensor(1.0))


def test_offset_noise_shifts_channel_means():
    g0, g1 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    plain = sample_noise((64, 4, 16, 16), g0)
    offset = sample_noise((64, 4, 16, 16), g1, offset=0.5)
    plain_spread = plain.mean(dim=(2, 3)).std()
    offset_spread = offset.mean(dim=(2, 3)).std()
    # Plain noise: channel means ~ N(0, 1/256) -> std ~0.06; offset adds N(0, 0.25) -> std ~0.5.
    assert plain_spread < 0.1 and 0.35 < offset_spread < 0.7
    assert not torch.allclose(plain, offset)


def test_objective_loss_is_weighted_mse_and_reproducible():
    ac = make_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012)
    obj = DiffusionObjective(ac, "v", min_snr_gamma=5.0)
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def model(x_t, t, scale=1.0):
        return scale * x_t

    loss_a = obj.loss(model, x0, {"scale": 0.5}, torch.Generator().manual_seed(7))
    batch = obj.prepare(x0, torch.Generator().manual_seed(7))
    per_sample = ((0.5 * batch.x_t - velocity(x0, (batch.x_t - ac[batch.t].sqrt().view(-1, 1, 1, 1) * x0)
                                             / (1 - ac[batch.t]).sqrt().view(-1, 1, 1, 1), ac, batch.t)) ** 2)
    expected = (per_sample.mean(dim=(1, 2, 3)) * min_snr_weight(snr(ac, batch.t), 5.0, "v")).mean()
    torch.testing.assert_close(loss_a, expected, rtol=1e-4, atol=1e-6)


def test_bad_parameterization_and_gamma_raise():
    ac = make_alphas_cumprod()
    with pytest.raises(ConfigError, match="parameterization"):
        DiffusionObjective(ac, "score")
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        DiffusionObjective(ac, "eps", min_snr_gamma=0.0)
