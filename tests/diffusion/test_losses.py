"""The discrete training loss: noised samples and targets against diffusers' DDPMScheduler, Min-SNR weights against
the closed form, offset noise, and distillation onto a teacher's prediction."""

from __future__ import annotations

import pytest
import torch

from t2i.diffusion.denoisers import DiscreteDenoiser
from t2i.diffusion.losses import DiscreteDiffusionLoss, min_snr_weight
from t2i.diffusion.parameterization import normalize_prediction
from t2i.diffusion.schedules import DiscreteSchedule
from t2i.errors import ConfigError

SCHEDULE = DiscreteSchedule("scaled_linear", 1000, 0.00085, 0.012)


@pytest.fixture()
def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         num_train_timesteps=1000)  # fmt: skip


class Spy(torch.nn.Module):
    """A network returning 0.5 x_t and remembering what it was called with."""

    def forward(self, x_t, t):
        self.seen = (x_t, t)
        return 0.5 * x_t


@pytest.mark.parametrize("prediction", ["eps", "epsilon", "v", "x0"])
def test_noised_samples_and_targets_match_diffusers(scheduler, prediction):
    """x_t and the target the loss builds from its own draws of t and noise equal diffusers' add_noise and
    get_velocity on the same t and noise (redrawn here from the same seed, in the same order)."""
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    denoiser = DiscreteDenoiser(Spy(), SCHEDULE, prediction)
    batch = DiscreteDiffusionLoss().prepare(denoiser, x0, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (6,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(batch.t, t)
    torch.testing.assert_close(batch.x_t, scheduler.add_noise(x0, noise, t))
    kind = normalize_prediction(prediction)
    expected = {"eps": noise, "v": scheduler.get_velocity(x0, noise, t), "x0": x0}[kind]
    torch.testing.assert_close(batch.target, expected)


def test_min_snr_weights_closed_form():
    ac = SCHEDULE.alphas_cumprod
    t = torch.arange(0, 1000, 37)
    s = (ac[t] / (1 - ac[t])).double()
    gamma = 5.0
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    snr = (ac[t] / (1 - ac[t])).float()
    torch.testing.assert_close(min_snr_weight(snr, gamma, "eps").double(), clipped / s, rtol=1e-5, atol=0)
    torch.testing.assert_close(min_snr_weight(snr, gamma, "v").double(), clipped / (s + 1), rtol=1e-5, atol=0)
    # Early (clean) steps are down-weighted, noisy steps keep weight 1 for eps.
    w = min_snr_weight(snr, gamma, "eps")
    assert w[0] < 0.01 and torch.allclose(w[-1], torch.tensor(1.0))


def test_offset_noise_shifts_channel_means():
    x0 = torch.zeros(64, 4, 16, 16)
    plain = DiscreteDiffusionLoss().noise(x0, torch.Generator().manual_seed(3))
    offset = DiscreteDiffusionLoss(offset_noise=0.5).noise(x0, torch.Generator().manual_seed(3))
    plain_spread = plain.mean(dim=(2, 3)).std()
    offset_spread = offset.mean(dim=(2, 3)).std()
    # Plain noise: channel means ~ N(0, 1/256) -> std ~0.06; offset adds N(0, 0.25) -> std ~0.5.
    assert plain_spread < 0.1 and 0.35 < offset_spread < 0.7
    assert not torch.allclose(plain, offset)


def test_loss_is_the_min_snr_weighted_mse_and_reproducible():
    loss = DiscreteDiffusionLoss(min_snr_gamma=5.0)
    denoiser = DiscreteDenoiser(Spy(), SCHEDULE, "v")
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    losses = loss(denoiser, x0, generator=torch.Generator().manual_seed(7))
    batch = loss.prepare(denoiser, x0, torch.Generator().manual_seed(7))
    ac = SCHEDULE.alphas_cumprod[batch.t]
    snr = ac / (1 - ac)
    per_sample = ((0.5 * batch.x_t - batch.target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses, per_sample * torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert torch.equal(losses, loss(denoiser, x0, generator=torch.Generator().manual_seed(7)))


def test_distillation_regresses_onto_the_teacher_at_the_same_noisy_input():
    loss = DiscreteDiffusionLoss()
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    student, teacher = Spy(), Spy()
    distilled = loss(DiscreteDenoiser(student, SCHEDULE), x0,
                     generator=torch.Generator().manual_seed(4),
                     teacher=DiscreteDenoiser(teacher, SCHEDULE))  # fmt: skip
    assert torch.equal(student.seen[0], teacher.seen[0]) and torch.equal(student.seen[1], teacher.seen[1])
    torch.testing.assert_close(distilled, torch.zeros(3))  # same network: zero until the student moves


def test_bad_prediction_and_gamma_raise():
    with pytest.raises(ConfigError, match="parameterization"):
        DiscreteDenoiser(Spy(), SCHEDULE, "score")
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        DiscreteDiffusionLoss(min_snr_gamma=0.0)
