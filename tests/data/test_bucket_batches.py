"""Single-bucket batches: one bucket per batch, no sample lost, ranks disjoint, exact resume (also across epochs and
with DataLoader workers, without decoding the samples already batched), the census."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from t2i.data.bucket_batches import BucketBatcher, bucket_census
from t2i.data.buckets import BucketTransform, make_buckets
from t2i.data.readers import build_dataset
from t2i.data.shapes_aspect import write_aspect_shapes_dataset

SIZES = [(48, 24), (24, 48), (36, 36), (40, 38)]
BUCKETS = tuple(make_buckets(24 * 24, 8, 16, 32))  # 16x32, 24x24, 32x16


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("aspect")
    write_aspect_shapes_dataset(root, 40, SIZES, seed=0, shard_size=10)
    return str(root / "shapes-{00000..00003}.tar")


def _samples(shards: str, *, rank: int = 0, world_size: int = 1, repeat: bool = False, flip: bool = True):
    transform = BucketTransform(BUCKETS, center_crop=False, random_flip=flip)
    return build_dataset(shards, 24, seed=7, rank=rank, world_size=world_size, shuffle_buffer=6, repeat=repeat,
                         transform=transform)  # fmt: skip


def _batches(batcher: BucketBatcher, num_workers: int = 0, limit: int | None = None, observe: bool = False):
    out = []
    for batch in DataLoader(batcher, batch_size=None, num_workers=num_workers):
        if observe:
            batcher.observe(batch)
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


def test_bucket_list_of_the_fixture():
    assert BUCKETS == ((16, 32), (24, 24), (32, 16))


def test_every_batch_is_one_bucket_and_a_pass_keeps_every_sample(shards):
    batches = _batches(BucketBatcher(_samples(shards), 3, flush_partial=True))
    keys = [k for b in batches for k in b["__key__"]]
    assert sorted(keys) == [f"{i:08d}" for i in range(40)]
    for batch in batches:
        height, width = batch["images"].shape[-2:]
        assert (width, height) in BUCKETS
        assert batch["target_size_as_tuple"].tolist() == [[height, width]] * len(batch["__key__"])
        assert batch["original_size_as_tuple"].shape == (len(batch["__key__"]), 2)
    full = [b for b in batches if len(b["__key__"]) == 3]
    assert len(batches) - len(full) <= len(BUCKETS)  # at most one partial batch per bucket, at the end
    sizes = Counter((b["images"].shape[-1], b["images"].shape[-2]) for b in batches for _ in b["__key__"])
    census, _ = bucket_census(_samples(shards).units, BUCKETS, ("png",))
    assert census == sizes and len(census) == 3  # the header scan counts what the batches hold


def test_ranks_batch_disjoint_shares(shards):
    per_rank = [
        [k for b in _batches(BucketBatcher(_samples(shards, rank=r, world_size=2), 2, flush_partial=True))
         for k in b["__key__"]]
        for r in range(2)
    ]  # fmt: skip
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"{i:08d}" for i in range(40)]


def _stream(shards: str, num_workers: int, count: int) -> list[dict]:
    return _batches(BucketBatcher(_samples(shards, repeat=True), 4), num_workers, limit=count)


@pytest.mark.parametrize("num_workers, stop", [(0, 3), (0, 11), (2, 7)])
def test_resume_continues_with_the_batches_of_the_uninterrupted_run(shards, num_workers, stop):
    total = 16  # 64 samples: the stream runs into its second epoch; stop 11 resumes inside it
    reference = _stream(shards, num_workers, total)
    assert max(b["__data__"]["epoch"] for b in reference) == 1
    first = BucketBatcher(_samples(shards, repeat=True), 4)
    consumed = _batches(first, num_workers, limit=stop, observe=True)
    state = first.state_dict()
    assert state["pending"] and all(isinstance(w, int) for w in state["workers"])
    resumed = BucketBatcher(_samples(shards, repeat=True), 4)
    resumed.load_state_dict(state)
    rest = _batches(resumed, num_workers, limit=total - stop)
    for got, want in zip(consumed + rest, reference, strict=True):
        assert got["__key__"] == want["__key__"]
        assert torch.equal(got["images"], want["images"])  # random crops and flips replay too
        assert torch.equal(got["crop_coords_top_left"], want["crop_coords_top_left"])


def test_resume_decodes_only_the_pending_samples(shards):
    first = BucketBatcher(_samples(shards, repeat=True), 4)
    _batches(first, limit=5, observe=True)
    state = first.state_dict()
    resumed_samples = _samples(shards, repeat=True)
    decoded: list[str] = []
    decoder = resumed_samples.decoder
    resumed_samples.decoder = lambda raw, rng: decoded.append(raw["__key__"]) or decoder(raw, rng)
    resumed = BucketBatcher(resumed_samples, 4)
    resumed.load_state_dict(state)
    _batches(resumed, limit=1)
    pending = len(state["pending"][0])
    head = state["workers"][0][1]
    assert 0 < pending < 20 and head >= 20
    # the rebuilt lists, then only what the next batch needed beyond the head
    assert pending <= len(decoded) <= pending + 4 * len(BUCKETS)


def test_plain_reader_state_resumes_after_its_positions(shards):
    plain = _samples(shards, repeat=True, flip=False)
    batches = DataLoader(plain, batch_size=None)
    seen = []
    for sample in batches:
        seen.append(sample["__key__"])
        plain.observe({"__data__": {k: [v] for k, v in sample["__data__"].items()}})
        if len(seen) == 9:
            break
    resumed = BucketBatcher(_samples(shards, repeat=True, flip=False), 4)
    resumed.load_state_dict(plain.state_dict())
    after = [k for b in _batches(resumed, limit=3) for k in b["__key__"]]
    order = [s["__key__"] for s in _samples(shards, flip=False)]
    assert not set(after) & set(seen) and set(after) <= set(order[9:])


def test_resume_with_other_worker_count_restarts_the_epoch(shards):
    first = BucketBatcher(_samples(shards, repeat=True), 4)
    _batches(first, num_workers=0, limit=4, observe=True)
    resumed = BucketBatcher(_samples(shards, repeat=True), 4)
    resumed.load_state_dict(first.state_dict())
    batches = _batches(resumed, num_workers=2, limit=6)  # saved with 1 worker: no replay, a fresh epoch 0
    assert [b["__key__"] for b in batches] == [b["__key__"] for b in _stream(shards, 2, 6)]
