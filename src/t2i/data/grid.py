"""Image grids with optional captions (sample grids for training logs and `t2i eval`)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from t2i.errors import InvalidInputError

_LINE_HEIGHT = 11  # PIL's default bitmap font is ~11 px tall
_CHAR_WIDTH = 6


def _wrap(caption: str, width_px: int, max_lines: int = 3) -> list[str]:
    lines = textwrap.wrap(caption, width=max(width_px // _CHAR_WIDTH, 4)) or [""]
    return lines[:max_lines]


def make_grid(
    images: Sequence[Image.Image],
    captions: Sequence[str] | None = None,
    ncols: int | None = None,
    pad: int = 2,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Tile `images` row-major into one RGB image, `ncols` per row (default ~square).

    Each cell is as large as the largest image; with `captions`, each image gets up to three wrapped lines
    of text below it (cells narrower than 96 px are widened so the text stays legible).
    """
    if not images:
        raise InvalidInputError("make_grid: got no images")
    if captions is not None and len(captions) != len(images):
        raise InvalidInputError(f"make_grid: {len(images)} images but {len(captions)} captions")
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    img_w = max(im.width for im in images)
    img_h = max(im.height for im in images)
    cell_w = max(img_w, 96) if captions is not None else img_w
    wrapped = [_wrap(c, cell_w) for c in captions] if captions is not None else None
    text_h = max(len(w) for w in wrapped) * _LINE_HEIGHT + 2 if wrapped else 0
    cell_h = img_h + text_h
    grid = Image.new("RGB", (ncols * (cell_w + pad) + pad, nrows * (cell_h + pad) + pad), background)
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, image in enumerate(images):
        row, col = divmod(i, ncols)
        x = pad + col * (cell_w + pad)
        y = pad + row * (cell_h + pad)
        grid.paste(image.convert("RGB"), (x + (cell_w - image.width) // 2, y))
        for j, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x + 1, y + img_h + 1 + j * _LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
    return grid
