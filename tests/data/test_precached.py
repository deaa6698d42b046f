"""Precached shards: tensors written by the writer come back bit-exact through the dataset."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from t2i.data.precached import PrecachedShardWriter, build_precached_dataset


def _sample(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    mask = torch.arange(6) < 2 + i % 4
    return {
        "mean": torch.randn(4, 2, 2, generator=g),
        "logvar": torch.randn(4, 2, 2, generator=g),
        "embeddings": torch.randn(6, 8, generator=g).to(torch.bfloat16),
        "mask": mask,
        "caption": f"caption {i}",
    }


def test_precached_round_trip(tmp_path: Path) -> None:
    with PrecachedShardWriter(tmp_path, shard_size=3) as writer:
        for i in range(7):
            writer.write(f"{i:04d}", **_sample(i))
    assert [p.name for p in writer.paths] == [f"precached-{i:05d}.tar" for i in range(3)]
    with (tmp_path / "precached-00002.tar").open("ab") as f:
        f.write(b"\0" * 10)  # trailing junk after the end marker is harmless
    ds = build_precached_dataset(str(tmp_path / "precached-*.tar"), shuffle=False)
    batches = list(DataLoader(ds, batch_size=4))
    keys = [k for b in batches for k in b["__key__"]]
    assert sorted(keys) == [f"{i:04d}" for i in range(7)]
    for batch in batches:
        for j, key in enumerate(batch["__key__"]):
            ref = _sample(int(key))
            assert torch.equal(batch["image_encoded"]["mean"][j], ref["mean"])
            assert torch.equal(batch["image_encoded"]["logvar"][j], ref["logvar"])
            assert batch["captions_encoded"]["embeddings"].dtype == torch.bfloat16
            assert torch.equal(batch["captions_encoded"]["embeddings"][j], ref["embeddings"])
            assert torch.equal(batch["captions_encoded"]["mask"][j], ref["mask"])
            assert batch["captions"][j] == ref["caption"]
    assert ds.stats.total == 0
