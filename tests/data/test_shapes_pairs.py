"""Two-object captioned shapes and their binding judge."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from t2i.data.judge_pairs import detect_objects, judge_pair, score_pairs
from t2i.data.shapes_pairs import (
    all_scenes,
    draw_pair,
    heldout_pair_prompts,
    iter_pairs,
    pair_caption,
    parse_pair_caption,
    scenes_for_split,
    write_pairs_dataset,
)
from t2i.errors import InvalidInputError


def test_split_holds_out_new_combinations_of_seen_bindings():
    train, heldout = scenes_for_split("train"), scenes_for_split("heldout")
    assert len(all_scenes()) == 960 and len(heldout) == 96 and not set(train) & set(heldout)
    for slot in (0, 2):  # every (colour, shape) binding trains in both slots, with both relations
        bindings = {(s[slot], s[slot + 1], s[4]) for s in train}
        assert len(bindings) == 6 * 4 * 2
    assert all(parse_pair_caption(pair_caption(s)) == s for s in all_scenes())
    assert heldout_pair_prompts()[0] == pair_caption(heldout[0])
    assert parse_pair_caption("a red circle in the top left") is None
    assert parse_pair_caption("a red circle above a red square") is None  # the two colours differ


def test_the_judge_scores_the_datasets_own_images_exactly():
    for split in ("train", "heldout"):
        images, prompts = [], []
        for _, image, scene in iter_pairs(300, 32, seed=4, split=split):
            images.append(image)
            prompts.append(pair_caption(scene))
        scores = score_pairs(images, prompts)
        assert scores["all"] >= 0.98 and scores["binding"] >= 0.98, scores


def test_wrong_binding_and_wrong_relation_are_caught():
    scene = ("red", "circle", "blue", "square", "beside")
    image = draw_pair(scene, 32, np.random.default_rng(0))
    assert judge_pair(image, scene)["all"] == 1.0
    swapped = judge_pair(image, ("blue", "square", "red", "circle", "beside"))  # the objects trade places
    assert swapped["binding"] == 1.0 and swapped["relation"] == 0.0 and swapped["all"] == 0.0
    rebound = judge_pair(image, ("red", "square", "blue", "circle", "beside"))  # colours on the wrong shapes
    assert rebound["colour"] == 1.0 and rebound["shape"] == 1.0 and rebound["binding"] == 0.0
    above = draw_pair(("red", "circle", "blue", "square", "above"), 32, np.random.default_rng(0))
    objects = detect_objects(above)
    assert [o.colour for o in sorted(objects, key=lambda o: o.y)] == ["red", "blue"]
    blank = judge_pair(Image.new("RGB", (32, 32), (255, 255, 255)), scene)
    assert blank == {"colour": 0.0, "shape": 0.0, "binding": 0.0, "relation": 0.0, "all": 0.0, "count": 0.0}


def test_dataset_shards_and_bad_prompts(tmp_path):
    import webdataset as wds

    shards = write_pairs_dataset(tmp_path, 10, 32, seed=0, shard_size=4)
    assert len(shards) == 3 and (tmp_path / "split.json").is_file()
    sample = next(iter(wds.WebDataset(str(shards[0]), shardshuffle=False)))
    assert parse_pair_caption(sample["txt"].decode()) is not None
    with pytest.raises(InvalidInputError, match="not a two-object shapes caption"):
        score_pairs([Image.new("RGB", (32, 32))], ["a red circle in the top left"])
