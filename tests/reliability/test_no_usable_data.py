"""Training with no usable sample fails within one pass with one line (skip counts by reason, what was expected),
instead of spinning at 100% CPU; captions are found where img2dataset and image folders put them."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line, autoencoder_config, image_bytes, one_line_error, write_tar
from t2i.errors import DataError


def _garbage_shards(root: Path) -> str:
    for name in ("a", "b"):
        (root / f"{name}.tar").write_bytes(b"not a tar file at all " * 50)
    return str(root / "{a,b}.tar")


def _undecodable_shard(root: Path) -> str:
    members = []
    for i in range(3):
        members += [(f"k{i}.jpg", b"\xff\xd8 not really a jpeg"), (f"k{i}.txt", f"caption {i}".encode())]
    return str(write_tar(root / "bad.tar", members))


def _image_shard(root: Path, caption: bool = True, json_meta: dict | None = None) -> str:
    members = []
    for i in range(3):
        members.append((f"k{i}.jpg", image_bytes("JPEG", i)))
        if caption:
            members.append((f"k{i}.txt", f"caption {i}".encode()))
        if json_meta is not None:
            members.append((f"k{i}.json", json.dumps(json_meta | {"key": f"k{i}"}).encode()))
    return str(write_tar(root / "images.tar", members))


def _precached_shard(root: Path) -> str:
    from t2i.data.precached import PrecachedShardWriter

    with PrecachedShardWriter(root / "pre", shard_size=10) as writer:
        for i in range(3):
            writer.write(f"p{i}", mean=torch.zeros(4, 2, 2), logvar=torch.zeros(4, 2, 2),
                         embeddings=torch.zeros(3, 8), mask=torch.ones(3, dtype=torch.bool), caption=f"c{i}")
    return str(root / "pre" / "precached-00000.tar")


def loader_error(loader, batches: int = 1) -> DataError:
    """The DataError raised while taking `batches` batches (its frames cleared, so worker processes stop now
    instead of when the garbage collector finds the iterator, which costs 5 s per worker)."""
    iterator = iter(loader)
    try:
        for _ in range(batches):
            next(iterator)
    except DataError as err:
        traceback.clear_frames(err.__traceback__)
        return err
    finally:
        del iterator
    raise AssertionError(f"{batches} batches and no DataError")


def _images_dataset(source: str, **kwargs):
    from t2i.data.readers import build_dataset

    return build_dataset(source, 16, seed=0, rank=0, world_size=1, repeat=True, **kwargs)


def _precached_dataset(source: str):
    from t2i.data.precached import build_precached_dataset

    return build_precached_dataset(source, seed=0, rank=0, world_size=1, repeat=True)


NO_USABLE_DATA = {
    "every_shard_unreadable": (_garbage_shards, _images_dataset, ["unreadable_shard 2", "2 shards"]),
    "every_sample_undecodable": (_undecodable_shard, _images_dataset, ["undecodable 3"]),
    "captions_nowhere": (lambda r: _image_shard(r, caption=False, json_meta={"width": 24}), _images_dataset,
                         ["missing_caption 3", "txt, json:caption, caption, text"]),
    "precached_keys_on_image_shards": (_image_shard, _precached_dataset, ["missing_image 3", ".image_encoded"]),
    "image_keys_on_precached_shards": (_precached_shard, _images_dataset, ["missing_image 3", ".jpg"]),
}


@pytest.mark.hang
@pytest.mark.deadline(30)
@pytest.mark.parametrize("case", list(NO_USABLE_DATA))
@pytest.mark.parametrize("num_workers", [0, 2])
def test_endless_dataset_without_usable_sample_fails_in_one_pass(tmp_path, case, num_workers):
    make_source, make_dataset, fragments = NO_USABLE_DATA[case]
    dataset = make_dataset(make_source(tmp_path))
    error = loader_error(torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=num_workers))
    assert_one_line(error, DataError, "data.train: no usable sample in one pass", *fragments)


@pytest.mark.hang
@pytest.mark.deadline(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_t2i_train_on_unusable_shards_is_one_line(tmp_path, capsys, single_thread, num_workers):
    config = autoencoder_config(tmp_path, _undecodable_shard(tmp_path), num_workers=num_workers)
    one_line_error(capsys, ["train", str(config)], "no usable sample in one pass", "undecodable 3")


@pytest.mark.hang
@pytest.mark.deadline(30)
def test_fewer_samples_than_readers_is_an_error_not_a_hang(tmp_path):
    source = str(write_tar(tmp_path / "one.tar", [("k.png", image_bytes()), ("k.txt", b"only one")]))
    error = loader_error(torch.utils.data.DataLoader(_images_dataset(source), batch_size=1, num_workers=2), 3)
    assert_one_line(error, DataError, "DataLoader worker 1 got no usable sample", "1 usable sample")


@pytest.mark.deadline(60)
def test_mostly_unreadable_shards_still_stream(tmp_path):
    """Guard against false alarms: a worker whose share of one epoch is all bad keeps going when others are not."""
    write_tar(tmp_path / "s0.tar", [m for i in range(4) for m in ((f"k{i}.png", image_bytes(seed=i)),
                                                                   (f"k{i}.txt", b"good"))])
    for name in ("s1", "s2", "s3"):
        (tmp_path / f"{name}.tar").write_bytes(b"garbage" * 100)
    loader = torch.utils.data.DataLoader(_images_dataset(str(tmp_path / "s{0..3}.tar")), batch_size=2,
                                         num_workers=2)
    batches = [batch for _, batch in zip(range(12), loader)]
    assert all(batch["captions"] == ["good", "good"] for batch in batches)


# ------------------------------------------------------------------------------------------- caption layouts


@pytest.mark.hang
@pytest.mark.deadline(30)
def test_img2dataset_caption_in_json_only(tmp_path):
    members = []
    for i in range(3):
        members += [(f"{i:09d}.jpg", image_bytes("JPEG", i)),
                    (f"{i:09d}.json", json.dumps({"caption": f"photo {i}", "url": "http://x", "key": f"{i:09d}",
                                                 "status": "success"}).encode())]
    stream = iter(_images_dataset(str(write_tar(tmp_path / "00000.tar", members))))
    captions = {next(stream)["captions"] for _ in range(6)}
    assert captions == {"photo 0", "photo 1", "photo 2"}


def _folder(root: Path, column: str) -> str:
    lines = []
    for i in range(3):
        (root / f"{i}.png").write_bytes(image_bytes(seed=i))
        lines.append(json.dumps({"file_name": f"{i}.png", column: f"{column} {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return str(root)


@pytest.mark.hang
@pytest.mark.deadline(30)
def test_image_folder_caption_column(tmp_path):
    stream = iter(_images_dataset(_folder(tmp_path, "caption")))
    assert {next(stream)["captions"] for _ in range(6)} == {"caption 0", "caption 1", "caption 2"}


def test_image_folder_text_column_still_works(tmp_path):
    from t2i.data.readers import build_dataset

    captions = {s["captions"] for s in build_dataset(_folder(tmp_path, "text"), 16, shuffle=False)}
    assert captions == {"text 0", "text 1", "text 2"}


@pytest.mark.silent
def test_caption_key_list_picks_the_first_present(tmp_path):
    from t2i.config import build_config
    from t2i.data.readers import build_dataset

    cfg = build_config({"data": {"caption_key": ["json:alt", "txt"]}})
    assert cfg.data.caption_key == ["json:alt", "txt"]
    members = [("a.png", image_bytes(seed=1)), ("a.json", b'{"alt": "from json"}'), ("a.txt", b"from txt"),
               ("b.png", image_bytes(seed=2)), ("b.txt", b"only txt")]
    source = str(write_tar(tmp_path / "s.tar", members))
    samples = {s["__key__"]: s["captions"] for s in build_dataset(source, 16, caption_keys=cfg.data.caption_key)}
    assert samples == {"a": "from json", "b": "only txt"}
    assert build_config({}, ["data.caption_key=txt"]).data.caption_key == ["txt"]
