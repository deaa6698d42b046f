"""Grid layout and image transforms against hand-computed pixels."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from t2i.data.grid import make_grid
from t2i.data.transforms import ImageTransform, resize_shorter_side, to_pil, to_tensor


def test_grid_places_images_row_major() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [Image.new("RGB", (10, 10), c) for c in colours]
    grid = make_grid(images, ncols=2, pad=2)
    assert grid.size == (2 * 12 + 2, 2 * 12 + 2)
    assert grid.getpixel((2, 2)) == colours[0] and grid.getpixel((14, 2)) == colours[1]
    assert grid.getpixel((2, 14)) == colours[2] and grid.getpixel((14, 14)) == (255, 255, 255)
    captioned = make_grid(images, captions=["a", "b", "c"], ncols=3)
    assert captioned.height > 14 and captioned.width >= 3 * 96


def test_tensor_round_trip_and_range() -> None:
    pixels = np.array([[[0, 127, 255]]], dtype=np.uint8)
    tensor = to_tensor(Image.fromarray(pixels))
    assert torch.allclose(tensor.flatten(), torch.tensor([-1.0, 127 / 127.5 - 1, 1.0]))
    assert np.array_equal(np.asarray(to_pil(tensor)[0]), pixels)


def test_resize_and_center_crop() -> None:
    image = Image.new("RGB", (60, 30))
    assert resize_shorter_side(image, 10).size == (20, 10)
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    pixels[:, 10:20] = 255  # white middle third survives a centre crop to 10x10
    out = ImageTransform(10)(Image.fromarray(pixels), np.random.default_rng(0))
    assert torch.equal(out, torch.ones(3, 10, 10))


def test_flip_is_off_by_default_and_random_when_on() -> None:
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[:, :4] = 255
    image = Image.fromarray(pixels)
    plain = ImageTransform(8)
    assert all(torch.equal(plain(image, np.random.default_rng(s)), to_tensor(image)) for s in range(8))
    flipping = ImageTransform(8, random_flip=True)
    outs = {bool(flipping(image, np.random.default_rng(s))[0, 0, 0] > 0) for s in range(16)}
    assert outs == {True, False}
