"""Aspect-ratio buckets: the bucket tables (SDXL's published one, NovelAI/kohya's rule by hand), nearest-aspect
assignment, resize-and-crop with the recorded crop, and the square case against ImageTransform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.data.buckets import BucketTransform, make_buckets, nearest_bucket, resize_to_cover
from t2i.data.transforms import ImageTransform, to_tensor
from t2i.errors import InvalidInputError

# SDXL's bucket table (Podell et al. 2023, appendix; as (height, width)): 20 portrait sizes, the square, and the
# 20 transposes.
SDXL_PORTRAIT_HW = [
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024),
]  # fmt: skip


def test_min_area_rule_reproduces_sdxl_table():
    table = {(w, h) for h, w in SDXL_PORTRAIT_HW} | {(h, w) for h, w in SDXL_PORTRAIT_HW} | {(1024, 1024)}
    buckets = make_buckets(1024**2, 64, 512, 2048, max_ratio=4, min_area=int(0.9 * 1024**2))
    assert len(buckets) == 41 and set(buckets) == table
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios) and buckets[0] == (512, 2048) and buckets[-1] == (2048, 512)


def test_novelai_rule_by_hand():
    # NovelAI's example area 512x768, sides 256..1024 step 64: per width the largest height with w*h <= area,
    # capped at 1024 (worked out by hand), their transposes, and the largest square (576: 640^2 > 512*768).
    per_width = {256: 1024, 320: 1024, 384: 1024, 448: 832, 512: 768, 576: 640, 640: 576, 704: 512, 768: 512,
                 832: 448, 896: 384, 960: 384, 1024: 384}  # fmt: skip
    expected = {(w, h) for w, h in per_width.items()} | {(h, w) for w, h in per_width.items()} | {(576, 576)}
    assert set(make_buckets(512 * 768, 64, 256, 1024)) == expected
    assert all(w * h <= 512 * 768 and w % 64 == 0 == h % 64 for w, h in expected)
    # max_ratio drops 256x1024 (4:1) at 3, and 320x1024 (3.2:1) too
    limited = set(make_buckets(512 * 768, 64, 256, 1024, max_ratio=3))
    assert expected - limited == {(256, 1024), (1024, 256), (320, 1024), (1024, 320)}


def test_bad_bucket_arguments_raise():
    with pytest.raises(InvalidInputError, match="no size fits"):
        make_buckets(100, 64, 256, 1024)
    with pytest.raises(InvalidInputError, match="min_size"):
        make_buckets(512**2, 64, 512, 256)


def test_nearest_bucket_is_nearest_in_log_aspect():
    buckets = [(512, 1024), (640, 768), (704, 704), (768, 640), (1024, 512)]
    assert nearest_bucket(300, 300, buckets) == (704, 704)
    assert nearest_bucket(2000, 1000, buckets) == (1024, 512)
    assert nearest_bucket(1000, 2000, buckets) == (512, 1024)
    # |log 1.5 - log 1.2| = 0.223 < |log 1.5 - log 2| = 0.288: 3:2 goes to 768x640, its transpose to 640x768
    assert nearest_bucket(1500, 1000, buckets) == (768, 640)
    assert nearest_bucket(1000, 1500, buckets) == (640, 768)


def _coordinate_image(width: int, height: int) -> Image.Image:
    """Each pixel's colour encodes its position, so any crop or flip is visible in the pixels."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    rgb = np.stack([x % 256, y % 256, (x * 7 + y * 13) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


@pytest.mark.parametrize("center_crop, random_flip", [(True, False), (False, False), (False, True)])
def test_bucket_transform_resizes_crops_and_records_the_crop(center_crop, random_flip):
    buckets = ((32, 64), (48, 48), (64, 32))
    transform = BucketTransform(buckets, center_crop, random_flip)
    image = _coordinate_image(150, 70)  # aspect 2.14 -> 64x32; covers at 69x32 (150 * 32/70 = 68.6 -> 69)
    flips = 0
    for seed in range(12):
        out = transform(image, np.random.default_rng(seed))
        assert out["images"].shape == (3, 32, 64)
        assert out["original_size_as_tuple"].tolist() == [70, 150] and out[
            "target_size_as_tuple"
        ].tolist() == [32, 64]
        top, left = out["crop_coords_top_left"].tolist()
        resized = resize_to_cover(image, 64, 32)
        assert resized.size == (69, 32) and top == 0 and 0 <= left <= 5
        if center_crop:
            assert left == (69 - 64) // 2
        rng = np.random.default_rng(seed)
        if not center_crop:
            rng.integers(6), rng.integers(1)  # the transform's left and top draws
        flipped = random_flip and rng.random() < 0.5
        flips += flipped
        source = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else resized
        expected = to_tensor(
            source.crop((left, top, left + 64, top + 32))
        )  # crop recorded in the image it cut
        assert torch.equal(out["images"], expected), seed
    assert (flips > 0) == random_flip


@pytest.mark.parametrize("center_crop, random_flip", [(True, False), (False, True)])
def test_one_square_bucket_equals_image_transform(center_crop, random_flip):
    square = BucketTransform(((24, 24),), center_crop, random_flip)
    reference = ImageTransform(24, center_crop, random_flip)
    for i, size in enumerate([(24, 24), (40, 30), (31, 57), (100, 25), (13, 20)]):
        image = _coordinate_image(*size)
        out = square(image, np.random.default_rng(i))
        assert torch.equal(out["images"], reference(image, np.random.default_rng(i))), size
        assert square.resolution == reference.resolution == 24
        assert out["original_size_as_tuple"].tolist() == [size[1], size[0]] and out[
            "target_size_as_tuple"
        ].tolist() == [24, 24]
