"""Two-object captioned shapes: attribute binding and spatial relations, the part of text-to-image that GenEval
and T2I-CompBench measure and single-object prompts do not.

Every image holds two flat shapes of different colours, side by side or one above the other:
"a red circle on the left and a blue square on the right", "a yellow cross above a green triangle". A scene is
(colour A, shape A, colour B, shape B, relation) with A on the left / on top: 6 x 4 x 5 x 4 x 2 = 960 scenes.

Held-out split: a scene with palette indices (a, s, b, t) and relation index r is held out when
``(a + 2 * s + 3 * b + t + 5 * r) % 10 == 0`` (96 scenes). Every (colour, shape) binding in either slot and every
colour pair keep training scenes, so a held-out prompt asks for a new combination of things the model has seen.
`t2i.data.judge_pairs` scores images of these prompts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from t2i.data.shapes import BACKGROUND, COLOURS, SHAPES, _paint, png_bytes, write_sample_shards
from t2i.errors import InvalidInputError

Scene = tuple[str, str, str, str, str]  # colour A, shape A, colour B, shape B, relation
RELATIONS: tuple[str, ...] = ("beside", "above")  # A on the left of B; A above B
OBJECT_SIZE = (0.62, 0.82)  # the side of each shape as a fraction of its half of the image


def _is_heldout(a: int, s: int, b: int, t: int, r: int) -> bool:
    return (a + 2 * s + 3 * b + t + 5 * r) % 10 == 0


def all_scenes() -> list[Scene]:
    colours = list(COLOURS)
    return [(ca, sa, cb, sb, rel) for ca in colours for sa in SHAPES for cb in colours if cb != ca
            for sb in SHAPES for rel in RELATIONS]  # fmt: skip


def is_heldout(scene: Scene) -> bool:
    colours = list(COLOURS)
    ca, sa, cb, sb, rel = scene
    return _is_heldout(colours.index(ca), SHAPES.index(sa), colours.index(cb), SHAPES.index(sb),
                       RELATIONS.index(rel))  # fmt: skip


def scenes_for_split(split: str) -> list[Scene]:
    """Scenes of a split: ``train``, ``heldout`` or ``all``."""
    if split not in ("train", "heldout", "all"):
        raise InvalidInputError(f"split: unknown value {split!r}; expected one of train, heldout, all")
    scenes = all_scenes()
    return scenes if split == "all" else [s for s in scenes if is_heldout(s) == (split == "heldout")]


def pair_caption(scene: Scene) -> str:
    ca, sa, cb, sb, rel = scene
    if rel == "beside":
        return f"a {ca} {sa} on the left and a {cb} {sb} on the right"
    return f"a {ca} {sa} above a {cb} {sb}"


def parse_pair_caption(text: str) -> Scene | None:
    """Invert `pair_caption`; None for text that is not a two-object caption."""
    words = text.strip().lower().rstrip(".").split()
    beside = ["a", None, None, "on", "the", "left", "and", "a", None, None, "on", "the", "right"]
    above = ["a", None, None, "above", "a", None, None]
    for pattern, relation, slots in ((beside, "beside", (1, 2, 8, 9)), (above, "above", (1, 2, 5, 6))):
        if len(words) == len(pattern) and all(p is None or p == w for p, w in zip(pattern, words, strict=True)):
            ca, sa, cb, sb = (words[i] for i in slots)
            valid = ca in COLOURS and cb in COLOURS and ca != cb and sa in SHAPES and sb in SHAPES
            return (ca, sa, cb, sb, relation) if valid else None
    return None


def heldout_pair_prompts() -> list[str]:
    return [pair_caption(s) for s in scenes_for_split("heldout")]


def draw_pair(scene: Scene, size: int, rng: np.random.Generator | None = None) -> Image.Image:
    """One ``size`` x ``size`` image of `scene`: A in the left (top) half, B in the other, each jittered."""
    rng = rng if rng is not None else np.random.default_rng(0)
    ca, sa, cb, sb, rel = scene
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    half = size / 2
    for slot, (colour, shape) in enumerate(((ca, sa), (cb, sb))):
        side = max(round(half * rng.uniform(*OBJECT_SIZE)), 3)
        if shape == "cross":
            side = max(3 * round(side / 3), 3)
        along = slot * half + half / 2 + rng.uniform(-1, 1) * max(half - side - 1, 0) / 2  # inside its half
        across = size / 2 + rng.uniform(-1, 1) * max(size - side - 2, 0) / 2 * 0.6  # anywhere, off the border
        cx, cy = (along, across) if rel == "beside" else (across, along)
        _paint(draw, shape, round(cx - side / 2), round(cy - side / 2), side, COLOURS[colour])
    return image


def iter_pairs(num: int, size: int, seed: int, split: str = "train") -> Iterator[tuple[str, Image.Image, Scene]]:
    """Yield ``(key, image, scene)`` for `num` samples; sample i depends only on (seed, i)."""
    if num < 0 or size < 16:
        raise InvalidInputError(f"pairs: need num >= 0 and size >= 16, got num={num} size={size}")
    scenes = scenes_for_split(split)
    for index in range(num):
        rng = np.random.default_rng([seed, index, 2])
        scene = scenes[int(rng.integers(len(scenes)))]
        yield f"{index:08d}", draw_pair(scene, size, rng), scene


def write_pairs_dataset(out: str | Path, num: int, size: int, seed: int, shard_size: int = 1000,
                        split: str = "train") -> list[Path]:
    """Write `num` two-object samples as webdataset shards (``.png``, ``.txt``, ``.json``) plus ``split.json``."""
    out = Path(out)
    samples = (
        {"__key__": key, "png": png_bytes(image), "txt": pair_caption(scene),
         "json": dict(zip(("colour_a", "shape_a", "colour_b", "shape_b", "relation"), scene, strict=True))}
        for key, image, scene in iter_pairs(num, size, seed, split)
    )  # fmt: skip
    shards = write_sample_shards(out, samples, shard_size)
    info = {"split": split, "num": num, "size": size, "seed": seed, "shards": [p.name for p in shards],
            "heldout_rule": "(colour_a + 2 * shape_a + 3 * colour_b + shape_b + 5 * relation) % 10 == 0",
            "heldout_prompts": heldout_pair_prompts()}  # fmt: skip
    (out / "split.json").write_text(json.dumps(info, indent=2))
    return shards
