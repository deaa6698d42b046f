"""Personalisation on the shapes demo: the new-colour data and judge, and a small end-to-end run.

The full measurement (docs/LORA.md) needs a trained demo pipeline and minutes of CPU, so it lives in
`python -m t2i.cli.lora personalize`, not in the suite.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.data.shapes import COLOURS, POSITIONS, SHAPES
from t2i.recipes.personalize import (
    NEW_COLOURS,
    PersonalizeSettings,
    concept_caption,
    concept_prompts,
    draw_concept,
    personalize,
    score_concept,
    vae_round_trip,
    write_concept_folder,
)


@pytest.mark.parametrize("colour", sorted(NEW_COLOURS))
def test_extended_judge_reads_every_drawn_concept_image_and_the_old_palette_cannot(colour):
    rng = np.random.default_rng(0)
    images, prompts = [], []
    for shape in SHAPES:
        for position in POSITIONS:
            images.append(draw_concept(colour, shape, position, 32, rng))
            prompts.append(concept_caption(colour, shape, position))
    assert score_concept(images, prompts, colour) == {
        "colour": 1.0,
        "shape": 1.0,
        "position": 1.0,
        "all": 1.0,
    }
    red = [Image.fromarray(np.where(np.asarray(im) == NEW_COLOURS[colour], COLOURS["red"], np.asarray(im))
                           .astype(np.uint8)) for im in images[:4]]  # fmt: skip
    assert score_concept(red, prompts[:4], colour)["colour"] == 0.0


class _FakeVAEPipeline:
    """A pipeline whose first stage is the identity, optionally painting every shape pixel red on decode."""

    device = "cpu"

    def __init__(self, recolour_to_red: bool) -> None:
        import torch

        red = torch.tensor(COLOURS["red"], dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1

        def decode(z):
            if recolour_to_red:
                shape = (z < 0.99).any(dim=1, keepdim=True)
                z = torch.where(shape, red.expand_as(z), z)
            return (z + 1) / 2

        self.first_stage = type("Identity", (), {"encode": staticmethod(lambda x, generator=None: x)})()
        self.decode = decode


@pytest.mark.parametrize(("recolour", "expected"), [(False, 1.0), (True, 0.0)])
def test_vae_round_trip_is_the_share_of_images_that_keep_the_new_colour(recolour, expected):
    assert vae_round_trip(_FakeVAEPipeline(recolour), "teal", size=32, count=8) == expected


def test_vae_round_trip_decodes_the_same_latents_whatever_the_global_seed(sd1_lora_dir):
    import t2i

    pipe = t2i.load_pipeline(sd1_lora_dir)
    decoded, decode = [], pipe.decode
    pipe.decode = lambda z: decoded.append(z) or decode(z)
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        vae_round_trip(pipe, "teal", size=32, count=4)
    assert decoded[0].std() > 0 and torch.equal(decoded[0], decoded[1])


def test_concept_folder_has_at_most_the_asked_images_with_captions(tmp_path):
    folder = write_concept_folder(tmp_path / "data", "brown", 10, 32, seed=0)
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 10 and len(list(folder.glob("*.png"))) == 10
    assert all(line["text"] in concept_prompts("brown") for line in lines)


def test_small_personalisation_run_writes_a_small_lora_and_scores(sd1_lora_dir, tmp_path):
    settings = PersonalizeSettings(num_images=8, steps=3, batch_size=2, prior_prompts=2, eval_seeds=1,
                                   sample_steps=2)  # fmt: skip
    results = personalize(sd1_lora_dir, tmp_path, settings)
    assert (tmp_path / "lora.safetensors").stat().st_size == results["lora_bytes"]
    # rank 4 on a tiny UNet (attention, feed-forward and ResBlock convs): a fraction of its weights, not all
    assert 0 < results["lora_share_of_unet"] < 0.25
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "lora.safetensors"))
    assert any(".resnets." in k and ".conv1." in k for k in keys) and any(".attn2.to_k." in k for k in keys)
    for part in ("new_concept", "old_concepts_heldout"):
        assert set(results[part]) == {"base", "lora"}
    saved = json.loads((tmp_path / "results.json").read_text())
    trips = saved["vae_round_trips"]  # auto: the candidate colour the VAE decodes best
    assert set(trips) == set(NEW_COLOURS) and saved["vae_round_trip"] == max(trips.values())
    assert trips[saved["colour"]] == saved["vae_round_trip"]
    assert saved["settings"]["prior_loss"] == "distill" and saved["settings"]["scale"] == 1.0
