"""Captioned shapes at several aspect ratios: the `t2i.data.shapes` dataset drawn on non-square canvases, for
training and testing aspect-ratio buckets.

A ``width x height`` image is split into the same 3x3 grid of (width / 3) x (height / 3) cells; the shape is the
one `draw_shape` paints in a square cell whose side is the smaller cell side, placed at a random offset inside its
grid cell. Captions, palette, held-out split and the judge (`t2i.data.judge`, which reads positions relative to
the image's own width and height) are those of `t2i.data.shapes`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from t2i.data.shapes import (
    BACKGROUND,
    POSITIONS,
    Combo,
    caption_for,
    draw_shape,
    png_bytes,
    sample_combo,
    split_description,
    write_sample_shards,
)
from t2i.errors import InvalidInputError

Size = tuple[int, int]  # (width, height)


def parse_sizes(text: str) -> list[Size]:
    """``"48x24,24x48"`` -> [(48, 24), (24, 48)]; InvalidInputError naming the bad item."""
    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts) or min(int(p) for p in parts) < 12:
            raise InvalidInputError(f"--sizes: {item.strip()!r} is not WIDTHxHEIGHT with both sides >= 12")
        sizes.append((int(parts[0]), int(parts[1])))
    return sizes


def draw_shape_sized(
    colour: str, shape: str, position: str, width: int, height: int, rng: np.random.Generator | None = None
) -> Image.Image:
    """One ``width x height`` RGB image of the combination; `rng` jitters the shape's size and offset."""
    if min(width, height) < 12:
        raise InvalidInputError(f"shapes: need width and height >= 12, got {width}x{height}")
    if position not in POSITIONS:
        raise InvalidInputError(f"draw_shape_sized: unknown position {position!r}")
    rng = rng if rng is not None else np.random.default_rng(0)
    cell_w, cell_h = width / 3, height / 3
    side = int(min(cell_w, cell_h))
    # the centre cell of a (3 side)^2 image is a side x side square holding the shape on the background
    patch = draw_shape(colour, shape, "center", 3 * side, rng).crop((side, side, 2 * side, 2 * side))
    row, col = divmod(POSITIONS.index(position), 3)
    left = int(col * cell_w + rng.uniform(0, cell_w - side))
    top = int(row * cell_h + rng.uniform(0, cell_h - side))
    image = Image.new("RGB", (width, height), BACKGROUND)
    image.paste(patch, (left, top))
    return image


def iter_aspect_shapes(
    num: int, sizes: Sequence[Size], seed: int, split: str = "train"
) -> Iterator[tuple[str, Image.Image, Combo]]:
    """Yield ``(key, image, combo)`` for `num` samples, each at one of `sizes` drawn uniformly; sample i depends
    only on (seed, i)."""
    if num < 0 or not sizes:
        raise InvalidInputError(f"shapes: need num >= 0 and at least one size, got num={num} sizes={sizes}")
    for index in range(num):
        rng = np.random.default_rng([seed, index])
        combo = sample_combo(split, rng)
        width, height = sizes[int(rng.integers(len(sizes)))]
        yield f"{index:08d}", draw_shape_sized(*combo, width, height, rng=rng), combo


def write_aspect_shapes_dataset(
    out: str | Path, num: int, sizes: Sequence[Size], seed: int, shard_size: int = 1000, split: str = "train"
) -> list[Path]:
    """Write `num` samples at the given (width, height) `sizes` as webdataset shards ``shapes-00000.tar``
    (``.png``, ``.txt``, ``.json`` with colour, shape, position, width, height) plus ``split.json``."""
    samples = (
        {"__key__": key, "png": png_bytes(image), "txt": caption_for(*combo),
         "json": {"colour": combo[0], "shape": combo[1], "position": combo[2], "width": image.width,
                  "height": image.height}}
        for key, image, combo in iter_aspect_shapes(num, sizes, seed, split)
    )  # fmt: skip
    out = Path(out)
    shards = write_sample_shards(out, samples, shard_size)
    info = split_description(split) | {"num": num, "sizes": [list(s) for s in sizes], "seed": seed,
                                       "shards": [p.name for p in shards]}  # fmt: skip
    (out / "split.json").write_text(json.dumps(info, indent=2))
    return shards
