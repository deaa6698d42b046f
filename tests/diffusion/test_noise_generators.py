"""`generator=[g0, g1, ...]`: one generator per batch row, so a row's noise does not depend on its batch."""

from __future__ import annotations

import pytest
import torch

from t2i.diffusion.samplers import get_sampler
from t2i.diffusion.tensors import noise_like, randn


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_each_row_comes_from_its_own_generator_exactly():
    x = torch.zeros(3, 2, 4, 4)
    noise = noise_like(x, gens(5, 6, 7))
    for i, seed in enumerate((5, 6, 7)):
        # a batch of one with a single generator draws the same numbers
        assert torch.equal(noise[i], noise_like(x[:1], torch.Generator().manual_seed(seed))[0])
    assert torch.equal(randn((2, 3), gens(1, 2))[1], torch.randn(3, generator=torch.Generator().manual_seed(2)))


def test_a_list_must_hold_one_generator_per_row():
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        noise_like(torch.zeros(3, 4), gens(1, 2))


class ScaledIdentity(torch.nn.Module):
    """D(x, sigma) = x / (1 + sigma^2): the exact denoiser of N(0, I) data; it mixes nothing across rows."""

    def forward(self, x, sigma, cond=None):
        return x / (1 + sigma.view(-1, *[1] * (x.ndim - 1)) ** 2)


@pytest.mark.parametrize("name", ["euler_ancestral", "ddpm", "dpmpp_2m_sde", "ddim", "euler"])
def test_stochastic_samplers_draw_each_row_from_its_generator(name):
    sampler = get_sampler(name)
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0])
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 10
    options = {"eta": 1.0} if name == "ddim" else {}
    batched = sampler(ScaledIdentity(), x.clone(), sigmas, generator=gens(1, 2, 3), **options)
    for i, seed in enumerate((1, 2, 3)):
        alone = sampler(ScaledIdentity(), x[i : i + 1].clone(), sigmas, generator=gens(seed), **options)
        assert torch.allclose(alone[0], batched[i], atol=1e-6, rtol=0), (name, i)
