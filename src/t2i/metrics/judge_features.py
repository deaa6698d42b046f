"""A feature space for captioned-shapes images built from the analytic judge's evidence (no network weights).

`judge_evidence` segments an image exactly as `t2i.data.judge.judge_image` does (border-median background,
foreground at half the peak distance, largest 8-connected component, colour from the most saturated core)
and keeps the measurements instead of the decisions. `judge_feature_vector` lays them out as 16 numbers,
each scaled to about [0, 1]:

====  ==========================================================================================
0-2   foreground colour: median RGB of the component's core / 255
3-5   background colour: median RGB of the border pixels / 255
6     contrast: largest RGB distance to the background / (255 * sqrt 3)
7-8   position: the component's centroid x / width, y / height
9-10  size: bounding-box width / width, height / height
11    area: component pixels / image pixels
12    fill: component pixels / bounding-box pixels (square ~1, circle ~0.8, cross ~0.56, triangle ~0.5)
13    vertical centroid inside the bounding box (an upright triangle's mass sits low: ~0.67)
14    corner fill: mean fill of the bounding box's four corner ninths (empty for a cross)
15    solidity: component pixels / convex hull area (a cross ~0.7, the other shapes ~1)
====  ==========================================================================================

A blank image (contrast below the judge's MIN_CONTRAST, or a component under MIN_AREA pixels) gets the
background as its foreground colour, the image centre as position, and zeros for 9-15, so blanks sit far
from every real shape. FID and KID on these vectors ("judge FID") measure how far generated shapes are from
the dataset's distribution of colour, position, size and geometry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from t2i.data.judge import MIN_AREA, MIN_CONTRAST, ShapeFeatures, largest_component, shape_features
from t2i.errors import InvalidInputError

JUDGE_FEATURES_NAME = "shapes-judge-v1"
NUM_JUDGE_FEATURES = 16
_MAX_DISTANCE = 255.0 * math.sqrt(3.0)


@dataclass(frozen=True)
class JudgeEvidence:
    """What the judge measures in one image; `mask` is None for a blank image."""

    foreground: np.ndarray  # (3,) RGB 0-255
    background: np.ndarray  # (3,) RGB 0-255
    contrast: float  # RGB distance 0-441
    mask: np.ndarray | None  # (H, W) bool: the largest foreground component
    geometry: ShapeFeatures | None


def judge_evidence(image: Image.Image) -> JudgeEvidence:
    """Segment `image` as `judge_image` does and return the measurements behind its decisions."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]], axis=0)
    background = np.median(border, axis=0)
    distance = np.linalg.norm(rgb - background, axis=-1)
    peak = float(distance.max())
    blank = JudgeEvidence(background, background, peak, None, None)
    if peak < MIN_CONTRAST:
        return blank
    mask = largest_component(distance >= 0.5 * peak)
    if mask.sum() < MIN_AREA:
        return blank
    core = mask & (distance >= 0.8 * distance[mask].max())
    foreground = np.median(rgb[core], axis=0)
    return JudgeEvidence(foreground, background, peak, mask, shape_features(mask))


def judge_feature_vector(image: Image.Image) -> np.ndarray:
    """The 16 judge features of one image (float64), laid out as the module docstring describes."""
    evidence = judge_evidence(image)
    colours = [
        *(evidence.foreground / 255.0),
        *(evidence.background / 255.0),
        evidence.contrast / _MAX_DISTANCE,
    ]
    if evidence.mask is None or evidence.geometry is None:
        return np.array([*colours, 0.5, 0.5, *([0.0] * 7)])
    height, width = evidence.mask.shape
    rows, cols = np.nonzero(evidence.mask)
    g = evidence.geometry
    geometry = [
        (cols.mean() + 0.5) / width,
        (rows.mean() + 0.5) / height,
        (cols.max() - cols.min() + 1) / width,
        (rows.max() - rows.min() + 1) / height,
        rows.size / (width * height),
        g.fill,
        g.centroid_y,
        g.corner_fill,
        g.solidity,
    ]
    return np.array(colours + geometry, dtype=np.float64)


class JudgeFeatures:
    """Feature extractor (see `t2i.metrics.features`): images -> judge features (N, 16) float64."""

    name = JUDGE_FEATURES_NAME

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.from_numpy(np.stack([judge_feature_vector(image) for image in images]))


def shapes_reference_images(
    prompts: Sequence[str], size: int, per_prompt: int = 4, seed: int = 0
) -> list[Image.Image]:
    """Dataset images for the shapes `prompts`: `per_prompt` renderings of each (size and position jittered
    as in the training data; rendering j of prompt i depends only on (seed, i, j))."""
    from t2i.data.shapes import draw_shape, parse_caption

    if per_prompt < 1:
        raise InvalidInputError(f"per_prompt: expected >= 1, got {per_prompt}")
    images = []
    for i, prompt in enumerate(prompts):
        combo = parse_caption(prompt)
        if combo is None:
            raise InvalidInputError(f"shapes reference: prompt {prompt!r} is not a shapes caption")
        for j in range(per_prompt):
            images.append(draw_shape(*combo, size=size, rng=np.random.default_rng([seed, i, j])))
    return images
