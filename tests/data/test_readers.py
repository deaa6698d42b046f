"""Readers: bad-data accounting, rank/worker splitting, deterministic order, exact resume, image folders."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from t2i.data.readers import build_dataset
from t2i.errors import DataError


def _image_bytes(fmt: str, seed: int, size: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _write_good_shard(path: Path, keys: list[str]) -> None:
    members = []
    for i, key in enumerate(keys):
        members += [(f"{key}.png", _image_bytes("PNG", i)), (f"{key}.txt", f"caption {key}".encode())]
    _write_tar(path, members)


@pytest.fixture
def bad_data(tmp_path: Path) -> tuple[str, Path]:
    """Four shards named by one brace pattern: bad members, truncated tar, garbage, missing."""
    jpeg = _image_bytes("JPEG", 1)
    _write_tar(tmp_path / "a.tar", [
        ("k0.jpg", jpeg), ("k0.txt", b"good zero"),
        ("k1.jpg", jpeg[: len(jpeg) // 2]), ("k1.txt", b"truncated jpeg"),
        ("k2.png", _image_bytes("PNG", 2)),  # no caption
        ("k3.png", b"\x89PNG garbage bytes"), ("k3.txt", b"garbage image"),
        ("k4.txt", b"caption without image"),
        ("k5.jpg", jpeg), ("k5.txt", b"\xff\xfe not utf-8"),
        ("k6.webp", _image_bytes("WEBP", 6)), ("k6.txt", b"good six"),
    ])  # fmt: skip
    _write_tar(tmp_path / "b.tar", [
        ("k7.png", _image_bytes("PNG", 7)), ("k7.txt", b"good seven"),
        ("k8.png", _image_bytes("PNG", 8)), ("k8.txt", b"good eight"),
        ("k9.png", _image_bytes("PNG", 9, size=64)), ("k9.txt", b"cut off"),
    ])  # fmt: skip
    with tarfile.open(tmp_path / "b.tar") as tar:
        member = tar.getmember("k9.png")
        cut = member.offset_data + member.size // 2
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[:cut])
    (tmp_path / "c.tar").write_bytes(b"this is not a tar file " * 100)
    return str(tmp_path / "{a,b,c,missing}.tar"), tmp_path


EXPECTED_COUNTS = {
    "undecodable": 2,  # k1 truncated jpeg, k3 garbage png
    "missing_caption": 1,  # k2
    "missing_image": 1,  # k4
    "corrupt_member": 2,  # k5 caption not UTF-8, b.tar cut inside k9.png
    "unreadable_shard": 2,  # c.tar not a tar, missing.tar
    "too_large": 0,
    "unsafe_path": 0,
}
GOOD_KEYS = {"k0", "k6", "k7", "k8"}


def test_bad_data_is_skipped_and_counted_in_process(bad_data: tuple[str, Path]) -> None:
    pattern, root = bad_data
    ds = build_dataset(pattern, 16, seed=0, rank=0, world_size=1)
    samples = list(ds)
    assert {s["__key__"] for s in samples} == GOOD_KEYS
    assert {s["captions"] for s in samples} == {"good zero", "good six", "good seven", "good eight"}
    for s in samples:
        assert s["images"].shape == (3, 16, 16) and s["images"].dtype == torch.float32
        assert -1.0 <= float(s["images"].min()) and float(s["images"].max()) <= 1.0
    assert ds.stats.counts == EXPECTED_COUNTS
    assert sorted(ds.stats.unreadable_shards) == [str(root / "c.tar"), str(root / "missing.tar")]


def test_bad_data_counts_flow_from_worker_processes(bad_data: tuple[str, Path]) -> None:
    pattern, _ = bad_data
    ds = build_dataset(pattern, 16, seed=0, rank=0, world_size=1)
    keys = [k for batch in DataLoader(ds, batch_size=2, num_workers=2) for k in batch["__key__"]]
    assert sorted(keys) == sorted(GOOD_KEYS)
    assert ds.stats.counts == EXPECTED_COUNTS


def test_source_matching_nothing_raises_data_error(tmp_path: Path) -> None:
    pattern = str(tmp_path / "nothing-{000..003}.tar")
    with pytest.raises(DataError, match="nothing-"):
        build_dataset(pattern, 16)
    with pytest.raises(DataError, match=r"\*\.tar"):
        build_dataset(str(tmp_path / "*.tar"), 16)


@pytest.fixture
def shards(tmp_path: Path) -> str:
    for s in range(4):
        _write_good_shard(tmp_path / f"s-{s:05d}.tar", [f"s{s}_{i:02d}" for i in range(6)])
    return str(tmp_path / "s-{00000..00003}.tar")


def _keys(ds, **loader) -> list[str]:
    return [k for batch in DataLoader(ds, batch_size=4, **loader) for k in batch["__key__"]]


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_ranks_partition_the_data(shards: str, world_size: int) -> None:
    # 4 shards: split by shard for 2 ranks, by sample for 3 and 8 (fewer shards than ranks).
    per_rank = [
        _keys(build_dataset(shards, 8, seed=1, rank=r, world_size=world_size)) for r in range(world_size)
    ]
    everything = [k for keys in per_rank for k in keys]
    assert len(everything) == len(set(everything)) == 24
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 24 // world_size


def test_order_depends_on_seed_and_epoch_only(shards: str) -> None:
    ds = build_dataset(shards, 8, seed=3, rank=0, world_size=1, shuffle_buffer=10)
    first = _keys(ds)
    assert _keys(build_dataset(shards, 8, seed=3, rank=0, world_size=1, shuffle_buffer=10)) == first
    ds.set_epoch(1)
    second = _keys(ds)
    assert sorted(second) == sorted(first) and second != first
    assert _keys(build_dataset(shards, 8, seed=4, rank=0, world_size=1, shuffle_buffer=10)) != first


def test_workers_see_disjoint_shards(shards: str) -> None:
    ds = build_dataset(shards, 8, seed=0, rank=0, world_size=1)
    keys = _keys(ds, num_workers=2)
    assert sorted(keys) == sorted(_keys(ds))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_from_state_dict(shards: str, num_workers: int) -> None:
    def make():
        return build_dataset(shards, 8, False, True, seed=5, rank=0, world_size=1, shuffle_buffer=8)

    reference = [
        (b["__key__"], b["images"]) for b in DataLoader(make(), batch_size=3, num_workers=num_workers)
    ]
    ds = make()
    for step, batch in enumerate(DataLoader(ds, batch_size=3, num_workers=num_workers)):
        ds.observe(batch)
        if step == 2:
            break
    resumed = make()
    resumed.load_state_dict(ds.state_dict())
    rest = [(b["__key__"], b["images"]) for b in DataLoader(resumed, batch_size=3, num_workers=num_workers)]
    consumed = {k for keys, _ in reference[:3] for k in keys}
    expected = [(k, img) for keys, imgs in reference for k, img in zip(keys, imgs) if k not in consumed]
    got = [(k, img) for keys, imgs in rest for k, img in zip(keys, imgs)]
    assert [k for k, _ in got] == [k for k, _ in expected]
    # Random crops and flips replay identically after the skip.
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, expected))


def test_repeat_runs_through_epochs(shards: str) -> None:
    ds = build_dataset(shards, 8, seed=0, rank=0, world_size=1, repeat=True)
    stream = iter(ds)
    epochs = [next(stream)["__data__"]["epoch"] for _ in range(30)]
    assert epochs[:24] == [0] * 24 and epochs[24:] == [1] * 6


def _epochs_of_keys(ds, epochs: int) -> list[list[str]]:
    out = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        out.append([s["__key__"] for s in ds])
    return out


def test_cache_in_memory_serves_the_same_stream_without_rereading(shards: str, tmp_path: Path) -> None:
    def make(cache: bool):
        return build_dataset(shards, 8, seed=2, rank=0, world_size=1, shuffle_buffer=10, cache_in_memory=cache)

    reference = _epochs_of_keys(make(False), 3)
    cached = make(True)
    first = [s["__key__"] for s in cached]
    for shard in tmp_path.glob("s-*.tar"):  # later epochs must come from memory
        shard.write_bytes(b"")
    later = []
    for epoch in (1, 2):
        cached.set_epoch(epoch)
        later.append([s["__key__"] for s in cached])
    assert [first, *later] == reference and reference[1] != reference[0]
    assert cached.stats.total == 0


def test_cache_in_memory_keeps_counting_unreadable_shards(bad_data: tuple[str, Path]) -> None:
    pattern, _ = bad_data
    cached, uncached = (build_dataset(pattern, 16, seed=0, rank=0, world_size=1, cache_in_memory=c) for c in (1, 0))
    passes = _epochs_of_keys(cached, 2)
    assert [set(keys) for keys in passes] == [GOOD_KEYS, GOOD_KEYS] and _epochs_of_keys(uncached, 2) == passes
    # bad samples and the truncated shard count again on the second pass, as without the cache
    assert cached.stats.counts["undecodable"] == 2 * EXPECTED_COUNTS["undecodable"]
    assert cached.stats.counts["corrupt_member"] == 2 * EXPECTED_COUNTS["corrupt_member"]
    assert cached.stats.counts == uncached.stats.counts


def test_imagefolder_with_metadata(tmp_path: Path) -> None:
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "wide.png")
    tall = np.zeros((30, 10, 3), dtype=np.uint8)
    tall[:10] = (0, 0, 255)  # blue top third, cropped away by the centre crop
    Image.fromarray(tall).save(tmp_path / "tall.png")
    lines = [
        {"file_name": "wide.png", "text": "a red rectangle"},
        {"file_name": "tall.png", "text": "black below blue"},
        {"file_name": "gone.png", "text": "no file"},
        {"file_name": "wide.png"},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\nnot json\n"
    (tmp_path / "metadata.jsonl").write_text(text)
    ds = build_dataset(str(tmp_path), 10, shuffle=False)
    samples = {s["captions"]: s["images"] for s in ds}
    assert set(samples) == {"a red rectangle", "black below blue"}
    expected_red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 10, 10)
    assert torch.allclose(samples["a red rectangle"], expected_red, atol=1e-6)
    assert torch.equal(samples["black below blue"], -torch.ones(3, 10, 10))
    counts = ds.stats.counts
    assert (counts["missing_image"], counts["missing_caption"], counts["corrupt_member"]) == (1, 1, 1)
