"""Analytic judge for two-object images (`t2i.data.shapes_pairs`): each object's colour and shape, whether they
are bound to the same object, the spatial relation, and the whole prompt.

Segmentation as `t2i.data.judge`: foreground = pixels far from the border's colour (half the image's largest
distance), 8-connected regions; the two largest regions of at least `MIN_AREA` pixels are the objects, each with
the colour of its most saturated pixels, its shape from its own mask, and its centroid.

Scores per prompt "a red circle on the left and a blue square on the right" (A = red circle, B = blue square):
- `colour`, `shape`: the share of the prompt's two colours (shapes) that some detected object has;
- `binding`: the share of the prompt's two objects drawn with both their colour and shape on one region;
- `relation`: both objects bound, and A's region left of (above) B's;
- `all`: the whole prompt right: exactly two objects, both bound, in the right relation;
- `count`: exactly two objects found.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from t2i.data.judge import (
    MIN_AREA,
    MIN_CONTRAST,
    _background,
    classify_colour,
    classify_shape,
    connected_components,
    shape_features,
)
from t2i.data.shapes_pairs import Scene, parse_pair_caption
from t2i.errors import InvalidInputError


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    x: float  # centroid, pixels
    y: float


def detect_objects(image: Image.Image, max_objects: int = 3) -> list[DetectedObject]:
    """The largest `max_objects` foreground regions of at least `MIN_AREA` pixels, largest first."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    background = _background(rgb)
    distance = np.linalg.norm(rgb - background, axis=-1)
    peak = float(distance.max())
    if peak < MIN_CONTRAST:
        return []
    objects = []
    for mask in connected_components(distance >= 0.5 * peak)[:max_objects]:
        if mask.sum() < MIN_AREA:
            break
        core = mask & (distance >= 0.8 * distance[mask].max())
        rows, cols = np.nonzero(mask)
        objects.append(DetectedObject(classify_colour(np.median(rgb[core], axis=0), background),
                                      classify_shape(shape_features(mask)), cols.mean() + 0.5, rows.mean() + 0.5))
    return objects


def judge_pair(image: Image.Image, scene: Scene) -> dict[str, float]:
    """The scores of one image against its scene (see the module docstring)."""
    ca, sa, cb, sb, relation = scene
    objects = detect_objects(image)
    two = objects[:2] if len(objects) >= 2 else objects
    colours, shapes = {o.colour for o in two}, {o.shape for o in two}
    match_a = next((o for o in two if (o.colour, o.shape) == (ca, sa)), None)
    match_b = next((o for o in two if (o.colour, o.shape) == (cb, sb) and o is not match_a), None)
    in_order = False
    if match_a is not None and match_b is not None:
        in_order = match_a.x < match_b.x if relation == "beside" else match_a.y < match_b.y
    count = len(objects) == 2
    return {
        "colour": ((ca in colours) + (cb in colours)) / 2,
        "shape": ((sa in shapes) + (sb in shapes)) / 2,
        "binding": ((match_a is not None) + (match_b is not None)) / 2,
        "relation": float(in_order),
        "all": float(in_order and count),
        "count": float(count),
    }


def score_pairs(images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, float]:
    """Mean scores over images and their two-object prompts, plus `n`."""
    if len(images) != len(prompts) or not images:
        raise InvalidInputError(f"score_pairs: need equally many images and prompts (>0), got "
                                f"{len(images)}/{len(prompts)}")  # fmt: skip
    rows = []
    for image, prompt in zip(images, prompts, strict=True):
        scene = parse_pair_caption(prompt)
        if scene is None:
            raise InvalidInputError(f"score_pairs: prompt {prompt!r} is not a two-object shapes caption")
        rows.append(judge_pair(image, scene))
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]} | {"n": float(len(rows))}
