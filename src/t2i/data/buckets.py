"""Aspect-ratio buckets: the bucket sizes, which bucket an image goes to, and resize-and-crop into it with the crop
recorded as micro-conditioning.

Buckets (`make_buckets`) are (width, height) pairs, both multiples of `step` within [min_size, max_size], as
NovelAI and kohya-ss define them: for every width, the largest height whose area fits `max_area`, plus the
transposes and the largest square. With `min_area` every pair whose area lies in [min_area, max_area] is a bucket
instead: SDXL's published table is `make_buckets(1024**2, 64, 512, 2048, max_ratio=4, min_area=0.9 * 1024**2)`.

An image goes to the bucket nearest its aspect ratio in log space (`nearest_bucket`: 2:1 and 1:2 are equally far
from 1:1), is resized (bicubic, antialiased) to the smallest size that covers the bucket, and cropped to it
(centred, or at a random offset). `BucketTransform` returns the image and, in the pixel units and (height, width) /
(top, left) order of SDXL's size conditioning:

    original_size_as_tuple  (2,) int64  the decoded image's (height, width) before resizing
    crop_coords_top_left    (2,) int64  the crop's (top, left) in the resized image (the flipped one if flipped)
    target_size_as_tuple    (2,) int64  the bucket's (height, width)

(NeMo's / sgm's batch keys, which SDXL's size embedders read.)

SD 1/2 ignore these entries; SDXL's size embedders read them. With one square bucket (R, R) the transform gives
exactly `ImageTransform(R)`'s pixels, so it also serves unbucketed SDXL runs. Grouping samples into single-bucket
batches with exact resume is `t2i.data.bucket_batches`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from t2i.data.transforms import to_tensor
from t2i.errors import InvalidInputError

Bucket = tuple[int, int]  # (width, height) in pixels
MICRO_CONDITIONING: tuple[str, ...] = (
    "original_size_as_tuple",
    "crop_coords_top_left",
    "target_size_as_tuple",
)


def make_buckets(
    max_area: int,
    step: int = 64,
    min_size: int = 256,
    max_size: int = 2048,
    max_ratio: float | None = None,
    min_area: int | None = None,
) -> list[Bucket]:
    """Bucket sizes (width, height), sorted by aspect ratio width / height (tallest first).

    Both sides are multiples of `step` in [min_size, max_size] (min_size is rounded up to a multiple of step).
    `min_area` None: NovelAI / kohya-ss (per width the largest height with area <= max_area, transposes, and the
    largest square); a number: every pair with min_area <= area <= max_area (SDXL). `max_ratio` drops buckets
    whose long side exceeds max_ratio x the short side.
    """
    if step < 1 or min_size < 1 or max_size < min_size or max_area < 1:
        raise InvalidInputError(
            f"buckets: need step >= 1, 1 <= min_size <= max_size and max_area >= 1; got step={step}, "
            f"min_size={min_size}, max_size={max_size}, max_area={max_area}"
        )
    sides = range(-(-min_size // step) * step, max_size + 1, step)
    if min_area is None:
        found: set[Bucket] = set()
        square = math.isqrt(max_area) // step * step
        if square in sides:
            found.add((square, square))
        for width in sides:
            height = min(max_size, max_area // width // step * step)
            if height >= sides.start:
                found |= {(width, height), (height, width)}
    else:
        found = {(w, h) for w in sides for h in sides if min_area <= w * h <= max_area}
    if max_ratio is not None:
        found = {(w, h) for w, h in found if max(w, h) <= max_ratio * min(w, h) + 1e-9}
    if not found:
        raise InvalidInputError(
            f"buckets: no size fits max_area={max_area}, step={step}, min_size={min_size}, max_size={max_size}, "
            f"max_ratio={max_ratio}, min_area={min_area}"
        )
    return sorted(found, key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest width / height in log space (ties: the larger bucket)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def resize_to_cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize keeping the aspect ratio to the smallest size that covers width x height (bicubic, antialiased)."""
    w, h = image.size
    scale = max(width / w, height / h)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    if size == (w, h):
        return image
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)


def micro_conditioning(original: Bucket, crop: tuple[int, int], target: Bucket) -> dict[str, torch.Tensor]:
    """The micro-conditioning entries of one sample from (width, height) sizes and the crop's (left, top)."""
    return {
        "original_size_as_tuple": torch.tensor([original[1], original[0]]),
        "crop_coords_top_left": torch.tensor([crop[1], crop[0]]),
        "target_size_as_tuple": torch.tensor([target[1], target[0]]),
    }


@dataclass(frozen=True)
class BucketTransform:
    """PIL image -> ``{"images": (3, h, w) in [-1, 1]}`` plus the `MICRO_CONDITIONING` entries, with (w, h) the
    image's nearest bucket (see the module docstring). Random crop and flip draw from the `rng`
    passed in, in `ImageTransform`'s order (left, top, flip), so one square bucket reproduces it exactly."""

    buckets: tuple[Bucket, ...]
    center_crop: bool = True
    random_flip: bool = False

    def __post_init__(self) -> None:
        if not self.buckets or any(min(b) < 1 for b in self.buckets):
            raise InvalidInputError(f"buckets: expected positive (width, height) sizes, got {self.buckets!r}")

    @property
    def resolution(self) -> int:
        """The shorter side a decoder must keep for any image to cover its bucket without upscaling (the
        largest bucket side); what a reader's reduced-scale JPEG decoding may shrink an image to, at least."""
        return max(max(b) for b in self.buckets)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        original = image.size
        width, height = nearest_bucket(*original, self.buckets)
        image = resize_to_cover(image, width, height)
        w, h = image.size
        if self.center_crop:
            left, top = (w - width) // 2, (h - height) // 2
        else:
            left, top = int(rng.integers(w - width + 1)), int(rng.integers(h - height + 1))
        image = image.crop((left, top, left + width, top + height))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = w - width - left  # the same pixels, cropped from the flipped image
        return {"images": to_tensor(image)} | micro_conditioning(original, (left, top), (width, height))


def sample_bucket(sample: dict) -> tuple[int, ...]:
    """The grouping key of a decoded sample: the spatial shape of its image or of its precached latents."""
    if "images" in sample:
        return tuple(sample["images"].shape[-2:])
    if "image_encoded" in sample:
        return tuple(sample["image_encoded"]["mean"].shape[-2:])
    raise InvalidInputError(f"buckets: sample {sample.get('__key__')!r} has neither images nor image_encoded")


def describe_buckets(buckets: Sequence[Bucket]) -> str:
    """One line listing the buckets, e.g. ``3 buckets: 512x768, 640x640, 768x512``."""
    return f"{len(buckets)} buckets: " + ", ".join(f"{w}x{h}" for w, h in buckets)
