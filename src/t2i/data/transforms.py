"""Image transforms for training: decode, resize the shorter side, crop, optional flip, scale to [-1, 1]."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from t2i.errors import InvalidInputError

# Decoded images larger than this many pixels are skipped (`data.max_image_pixels`); 8192 x 8192 RGB is 192 MiB.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageTooLarge(ValueError):
    """An image whose decoded size exceeds the pixel limit (raised before its pixels are decoded)."""


def decode_image(data: bytes, min_side: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Decode image bytes fully into an RGB PIL image (transparent pixels composited on white).

    `min_side`: the shorter side the caller needs; JPEGs at least 4x larger are decoded at a reduced scale
    (libjpeg's DCT scaling, `Image.draft`) whose shorter side is still >= 2 * `min_side`. `max_pixels`:
    an image that would still decode to more pixels raises `ImageTooLarge` before its pixels are read.
    16-bit greyscale (PNG/TIFF modes I;16*, I) is scaled to 8 bits, not clipped. Raises whatever PIL raises
    for truncated or invalid data; `load()` forces the full decode so a truncated file fails here.
    """
    with warnings.catch_warnings():
        if max_pixels is not None:  # our own limit replaces PIL's decompression-bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exn:
            raise ImageTooLarge(str(exn)) from None
    if min_side is not None and image.format == "JPEG" and min(image.size) >= 4 * min_side:
        # decode at 1/2, 1/4 or 1/8 scale, keeping >= 2x the needed side so the bicubic resize still antialiases
        scale = 2 * min_side / min(image.size)
        image.draft(image.mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ImageTooLarge(f"{image.width}x{image.height} pixels exceeds data.max_image_pixels={max_pixels}")
    image.load()
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_grey_to_rgb(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _sixteen_bit_grey_to_rgb(image: Image.Image) -> Image.Image:
    """0..65535 grey -> 0..255 RGB (round(v / 257)); PIL's own convert clips at 255 instead of scaling."""
    values = np.asarray(image).astype(np.float64)
    grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2)))


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size`, keeping the aspect ratio (bicubic, antialiased)."""
    w, h = image.size
    scale = size / min(w, h)
    new_size = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new_size == (w, h):
        return image
    return image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=None)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float tensor (B, 3, H, W) or (3, H, W) in [-1, 1] -> list of RGB PIL images."""
    images = images.detach().float().cpu()
    if images.ndim == 3:
        images = images[None]
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


@dataclass(frozen=True)
class ImageTransform:
    """Resize (shorter side) -> crop to `resolution` square -> optional horizontal flip -> tensor in [-1, 1].

    Random crop and flip draw from the `rng` passed to `__call__`, so a seeded reader is reproducible.
    Flip is off by default because captions may say "left" or "right".
    """

    resolution: int
    center_crop: bool = True
    random_flip: bool = False

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise InvalidInputError(f"data.resolution: expected a positive integer, got {self.resolution}")

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        """PIL image -> (3, resolution, resolution) float tensor in [-1, 1]."""
        image = resize_shorter_side(image, self.resolution)
        w, h = image.size
        if self.center_crop:
            left, top = (w - self.resolution) // 2, (h - self.resolution) // 2
        else:
            left = int(rng.integers(w - self.resolution + 1))
            top = int(rng.integers(h - self.resolution + 1))
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(image)
