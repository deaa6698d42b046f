"""Reading image sets: plain folders with sibling captions, shards, metadata.jsonl folders, bad files, prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2i.data.shapes import write_shapes_dataset
from t2i.data.stats import DataStats
from t2i.errors import DataError, InvalidInputError
from t2i.metrics.images import count_images, iter_images, read_prompts


def solid(value: int, size: tuple[int, int] = (8, 6)) -> Image.Image:
    return Image.new("RGB", size, (value, value, value))


def test_plain_folder_recursive_sorted_with_captions_and_bad_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    solid(10).save(tmp_path / "b.png")
    solid(20).save(tmp_path / "a.jpg", quality=100)
    solid(30).save(tmp_path / "sub" / "c.webp", lossless=True)
    (tmp_path / "a.txt").write_text("a grey square\n")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "notes.md").write_text("ignored")
    stats = DataStats()
    items = list(iter_images(tmp_path, stats))
    assert [i.key for i in items] == ["a", "b", "sub/c"]
    assert [i.caption for i in items] == ["a grey square", None, None]
    assert np.asarray(items[2].image)[0, 0].tolist() == [30, 30, 30] and items[0].image.size == (8, 6)
    assert stats.counts["undecodable"] == 1
    assert count_images(tmp_path) == 4  # counted before decoding
    assert [i.key for i in iter_images(tmp_path, limit=2)] == ["a", "b"]


def test_shards_and_metadata_folder(tmp_path: Path) -> None:
    write_shapes_dataset(tmp_path / "shards", num=7, size=16, seed=0, shard_size=3)
    items = list(iter_images(str(tmp_path / "shards" / "shapes-{00000..00002}.tar")))
    assert len(items) == 7 and all(i.caption and i.image.size == (16, 16) for i in items)
    assert len(list(iter_images(tmp_path / "shards"))) == 7  # a folder of shards
    assert count_images(tmp_path / "shards") is None

    folder = tmp_path / "imagefolder"
    folder.mkdir()
    solid(5).save(folder / "x.png")
    lines = [{"file_name": "x.png", "text": "dark"}, {"file_name": "gone.png", "text": "missing"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    stats = DataStats()
    items = list(iter_images(folder, stats))
    assert [(i.key, i.caption) for i in items] == [("x", "dark")] and stats.counts["missing_image"] == 1


@pytest.mark.parametrize("make", ["missing", "empty_dir", "no_match_glob"])
def test_nothing_readable_is_a_one_line_data_error(tmp_path: Path, make: str) -> None:
    source = {"missing": tmp_path / "nope", "empty_dir": tmp_path, "no_match_glob": tmp_path / "*.tar"}[make]
    with pytest.raises(DataError) as info:
        list(iter_images(source))
    assert "\n" not in str(info.value) and str(source) in str(info.value)


def test_read_prompts(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue square  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a red circle", "a blue square"]
    (tmp_path / "empty.txt").write_text("\n\n")
    for path in (tmp_path / "empty.txt", tmp_path / "missing.txt"):
        with pytest.raises(InvalidInputError) as info:
            read_prompts(path)
        assert "\n" not in str(info.value)
