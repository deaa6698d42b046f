"""Analytic judge for captioned-shapes images: colour, shape and position without any learned model.

Steps for one image (``judge_image``):
1. Background = median colour of the border pixels; foreground = pixels whose RGB distance to it is at least
   half of the largest distance in the image (so blurry or washed-out generations still segment).
2. Keep the largest 8-connected foreground component (specks from a noisy generation are ignored).
3. Colour: median of the component's most saturated pixels, matched to the palette colour whose segment from
   the background is nearest (a shape blended with white stays on that segment, so pale red is still red).
4. Position: the component's centroid in the 3x3 grid.
5. Shape from bounding-box features: fill ratio (square ~1, circle ~0.8, cross ~0.56, triangle ~0.5),
   vertical centroid (an upright triangle's mass sits low) and the fill of the bbox's corner blocks
   (empty for a cross, partly filled for a circle).
A blank image (no pixel far enough from the background) yields a Detection with all fields None.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from t2i.data.shapes import COLOURS, grid_cell, parse_caption
from t2i.errors import InvalidInputError

# Below this RGB distance from the background an image counts as blank.
MIN_CONTRAST = 48.0
MIN_AREA = 4


@dataclass(frozen=True)
class Detection:
    """What the judge sees in one image; a field is None when it could not be determined."""

    colour: str | None
    shape: str | None
    position: str | None


@dataclass(frozen=True)
class ShapeFeatures:
    """Geometric features of a binary mask cropped to its bounding box."""

    fill: float  # area / bbox area
    centroid_y: float  # centroid row / bbox height, 0 = top
    corner_fill: float  # mean fill of the four corner blocks (a third of the bbox each way)
    aspect: float  # width / height
    solidity: float  # area / convex hull area (a cross is concave: ~0.7; the other shapes ~1)


def _background(rgb: np.ndarray) -> np.ndarray:
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]], axis=0)
    return np.median(border, axis=0)


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """Boolean masks (H, W) of the 8-connected True regions of `mask`, largest first."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    sizes: dict[int, int] = {}
    current = 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        current += 1
        labels[start] = current
        stack, size = [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny in range(max(y - 1, 0), min(y + 2, height)):
                for nx in range(max(x - 1, 0), min(x + 2, width)):
                    if mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = current
                        stack.append((ny, nx))
        sizes[current] = size
    return [labels == label for label in sorted(sizes, key=lambda k: -sizes[k])]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask (H, W) of the largest 8-connected True region of `mask` (all False if none)."""
    components = connected_components(mask)
    return components[0] if components else np.zeros_like(mask)


def _cross(o: tuple[int, int], a: tuple[int, int], b: tuple[int, int]) -> int:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the True pixels' squares (monotone chain over each row's end corners)."""
    points = set()
    for y in np.nonzero(mask.any(axis=1))[0]:
        xs = np.nonzero(mask[y])[0]
        for x in (int(xs[0]), int(xs[-1]) + 1):
            points.update({(x, int(y)), (x, int(y) + 1)})
    ordered = sorted(points)
    lower: list[tuple[int, int]] = []
    upper: list[tuple[int, int]] = []
    for chain, seq in ((lower, ordered), (upper, reversed(ordered))):
        for p in seq:
            while len(chain) >= 2 and _cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
    hull = lower[:-1] + upper[:-1]
    xs, ys = np.array([p[0] for p in hull], float), np.array([p[1] for p in hull], float)
    return 0.5 * abs(float(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))


def shape_features(mask: np.ndarray) -> ShapeFeatures:
    """Features of the True pixels of `mask` (H, W) cropped to their bounding box."""
    rows, cols = np.nonzero(mask)
    crop = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].astype(np.float64)
    h, w = crop.shape
    bh, bw = max(round(h / 3), 1), max(round(w / 3), 1)
    corners = [crop[:bh, :bw], crop[:bh, -bw:], crop[-bh:, :bw], crop[-bh:, -bw:]]
    centroid_y = (rows.mean() - rows.min() + 0.5) / h
    return ShapeFeatures(
        fill=float(crop.mean()),
        centroid_y=float(centroid_y),
        corner_fill=float(np.mean([c.mean() for c in corners])),
        aspect=w / h,
        solidity=float(crop.sum() / max(_hull_area(crop > 0), 1.0)),
    )


def classify_shape(f: ShapeFeatures) -> str:
    """Decision rules on `ShapeFeatures`; thresholds sit midway between the shapes' typical values."""
    if f.centroid_y > 0.57:
        return "triangle"
    if f.solidity < 0.8:
        return "cross"
    if f.fill > 0.92:
        return "square"
    return "circle"


def classify_colour(
    pixel: np.ndarray, background: np.ndarray, palette: dict[str, tuple[int, int, int]] | None = None
) -> str:
    """Colour of `palette` (default: the dataset's) whose line segment background -> colour passes closest to
    `pixel` (RGB floats)."""
    best, best_dist = "", np.inf
    offset = pixel - background
    for name, rgb in (COLOURS if palette is None else palette).items():
        direction = np.asarray(rgb, dtype=np.float64) - background
        alpha = np.clip(offset @ direction / max(direction @ direction, 1e-9), 0.0, 1.0)
        dist = float(np.linalg.norm(offset - alpha * direction))
        if dist < best_dist:
            best, best_dist = name, dist
    return best


def judge_image(image: Image.Image, palette: dict[str, tuple[int, int, int]] | None = None) -> Detection:
    """Detect (colour, shape, position) in one image; None fields when the image is blank. `palette` replaces
    the dataset's colours (a personalisation run adds new ones)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    background = _background(rgb)
    distance = np.linalg.norm(rgb - background, axis=-1)
    peak = float(distance.max())
    if peak < MIN_CONTRAST:
        return Detection(None, None, None)
    mask = largest_component(distance >= 0.5 * peak)
    if mask.sum() < MIN_AREA:
        return Detection(None, None, None)
    core = mask & (distance >= 0.8 * distance[mask].max())
    colour = classify_colour(np.median(rgb[core], axis=0), background, palette)
    rows, cols = np.nonzero(mask)
    position = grid_cell(cols.mean() + 0.5, rows.mean() + 0.5, rgb.shape[1], rgb.shape[0])
    return Detection(colour, classify_shape(shape_features(mask)), position)


def score(images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, float]:
    """Judge each image against its prompt.

    Returns ``{"colour", "shape", "position", "all": accuracy in [0, 1], "n": count}``; an image whose
    detection has a None field counts as wrong on that attribute (and on "all").
    """
    if len(images) != len(prompts) or not images:
        raise InvalidInputError(
            f"score: need equally many images and prompts (>0), got {len(images)}/{len(prompts)}"
        )
    hits = np.zeros((len(images), 3), dtype=bool)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        expected = parse_caption(prompt)
        if expected is None:
            raise InvalidInputError(f"score: prompt {prompt!r} is not a shapes caption")
        found = judge_image(image)
        hits[i] = [found.colour == expected[0], found.shape == expected[1], found.position == expected[2]]
    accuracy = hits.mean(axis=0)
    return {
        "colour": float(accuracy[0]),
        "shape": float(accuracy[1]),
        "position": float(accuracy[2]),
        "all": float(hits.all(axis=1).mean()),
        "n": float(len(images)),
    }
