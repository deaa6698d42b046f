"""Analytic judge: >= 99% on the dataset's own images, graceful on blank and blurry images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from t2i.data import judge as J
from t2i.data.shapes import caption_for, iter_shapes


@pytest.mark.parametrize("size", [32, 64])
def test_judge_is_accurate_on_dataset_images(size: int) -> None:
    images, prompts = [], []
    for _, image, combo in iter_shapes(500, size, seed=100 + size, split="all"):
        images.append(image)
        prompts.append(caption_for(*combo))
    result = J.score(images, prompts)
    assert result["n"] == 500
    for key in ("colour", "shape", "position", "all"):
        assert result[key] >= 0.99, (key, result)


def test_blank_image_gives_none_and_counts_as_wrong() -> None:
    blank = Image.new("RGB", (32, 32), (200, 200, 200))
    assert J.judge_image(blank) == J.Detection(None, None, None)
    result = J.score([blank], ["a red circle in the center"])
    assert result == {"colour": 0.0, "shape": 0.0, "position": 0.0, "all": 0.0, "n": 1.0}


def test_wrong_attributes_are_scored_wrong() -> None:
    _, image, combo = next(iter_shapes(1, 64, seed=0, split="all"))
    other_colour = "blue" if combo[0] != "blue" else "red"
    result = J.score([image], [caption_for(other_colour, combo[1], combo[2])])
    assert (result["colour"], result["shape"], result["position"], result["all"]) == (0.0, 1.0, 1.0, 0.0)


def test_blurry_noisy_images_still_mostly_judged() -> None:
    rng = np.random.default_rng(0)
    images, prompts = [], []
    for _, image, combo in iter_shapes(100, 64, seed=5, split="all"):
        blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), float)
        noisy = np.clip(blurred + rng.normal(0, 6, blurred.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(noisy))
        prompts.append(caption_for(*combo))
    result = J.score(images, prompts)
    assert result["colour"] >= 0.95 and result["position"] >= 0.95 and result["shape"] >= 0.8


def test_pale_colour_maps_to_its_hue() -> None:
    # A red shape washed halfway to the white background is still red, not orange or purple.
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    image.paste((238, 143, 143), (12, 12, 20, 20))
    assert J.judge_image(image) == J.Detection("red", "square", "center")
