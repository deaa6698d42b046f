"""Captioned shapes: held-out split properties, captions, shard writing."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from t2i.data import shapes as S
from t2i.errors import InvalidInputError


def test_palette_is_well_separated_and_large_enough() -> None:
    assert len(S.COLOURS) >= 6 and len(S.SHAPES) >= 4 and len(S.POSITIONS) == 9
    rgbs = [np.array(c, float) for c in [*S.COLOURS.values(), S.BACKGROUND]]
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(rgbs, 2)) > 60


def test_heldout_is_about_ten_percent_and_keeps_every_pair_in_training() -> None:
    held, train = set(S.HELDOUT_COMBOS), S.training_combos()
    assert len(held) == 22 and len(train) == 216 - 22 and not held & set(train)
    for a, b in itertools.combinations(range(3), 2):
        pairs_all = {(c[a], c[b]) for c in S.all_combos()}
        assert {(c[a], c[b]) for c in train} == pairs_all  # every pair of attributes is still trained


def test_captions_round_trip() -> None:
    for combo in S.all_combos():
        assert S.parse_caption(S.caption_for(*combo)) == combo
    assert S.caption_for("red", "circle", "top left") == "a red circle in the top left"
    assert S.parse_caption("a pink circle in the top left") is None
    assert S.parse_caption("a red circle somewhere") is None
    with pytest.raises(InvalidInputError):
        S.caption_for("red", "hexagon", "top")
    assert S.heldout_prompts() == [S.caption_for(*c) for c in S.HELDOUT_COMBOS]


def test_write_shapes_dataset(tmp_path: Path) -> None:
    shards = S.write_shapes_dataset(tmp_path, num=25, size=32, seed=7, shard_size=10, split="train")
    assert [p.name for p in shards] == ["shapes-00000.tar", "shapes-00001.tar", "shapes-00002.tar"]
    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False).decode("pil"))
    assert len(samples) == 25
    held = set(S.HELDOUT_COMBOS)
    for sample in samples:
        combo = (sample["json"]["colour"], sample["json"]["shape"], sample["json"]["position"])
        assert S.parse_caption(sample["txt"]) == combo and combo not in held
        assert sample["png"].size == (32, 32)
    info = json.loads((tmp_path / "split.json").read_text())
    assert [tuple(c) for c in info["heldout_combos"]] == list(S.HELDOUT_COMBOS)
    assert (tmp_path / "README.md").is_file()
    again = list(S.iter_shapes(25, 32, seed=7))
    assert all(np.array_equal(np.asarray(a[1]), np.asarray(s["png"])) for a, s in zip(again, samples))


def test_heldout_split_only_has_heldout_combos() -> None:
    combos = {combo for _, _, combo in S.iter_shapes(200, 24, seed=0, split="heldout")}
    assert combos <= set(S.HELDOUT_COMBOS) and len(combos) > 15
    with pytest.raises(InvalidInputError, match="split"):
        list(S.iter_shapes(1, 24, seed=0, split="test"))
