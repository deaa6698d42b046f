"""`LatentPipeline.generate/reconstruct(generator=[...])`: one generator per output image."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from helpers import build_tiny_pipeline

from t2i.errors import InvalidInputError


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


def seeded(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_generate_draws_each_images_latents_from_its_generator(pipe):
    out = pipe.generate(["a", "b"], num_images=2, height=16, width=16, steps=1, guidance_scale=1.0,
                        generator=seeded(1, 2, 3, 4), progress=False, sampler="euler_ancestral")
    one = pipe.generate("b", height=16, width=16, steps=1, guidance_scale=1.0, seed=4, progress=False,
                        sampler="euler_ancestral")
    assert (out.pixels[3] - one.pixels[0]).abs().max() <= 1e-5
    with pytest.raises(InvalidInputError, match="3 generators for 4 images"):
        pipe.generate(["a", "b"], num_images=2, height=16, width=16, steps=1, generator=seeded(1, 2, 3),
                      progress=False)


def test_reconstruct_draws_each_images_noise_from_its_generator(pipe):
    init = pipe.generate("a red circle", height=16, width=16, steps=2, seed=0, progress=False).images[0]
    both = pipe.reconstruct(["a", "b"], init, strength=0.5, steps=4, generator=seeded(7, 8), progress=False)
    alone = pipe.reconstruct("b", init, strength=0.5, steps=4, seed=8, progress=False)
    assert (both.pixels[1] - alone.pixels[0]).abs().max() <= 1e-5
    assert (both.pixels[0] - both.pixels[1]).abs().max() > 0.05


def test_callback_sees_every_step(pipe):
    seen = []
    pipe.generate("a", height=16, width=16, steps=3, seed=0, progress=False,
                  callback=lambda i, sigma, x, x0: seen.append(i))
    assert seen == [0, 1, 2]
