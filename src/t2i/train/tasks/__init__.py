"""Training tasks (one per `model.kind`) and the data plumbing they share.

`t2i.train.task.build_task` imports `t2i.train.tasks.latent` / `.autoencoder` on demand; each registers its
factory with `@register_task(kind)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class ObservedLoader:
    """A DataLoader over an endless (`repeat=True`) `ShardDataset` that reports every batch it hands out.

    The dataset records the position of each consumed batch (`observe`), so `state_dict()` / `load_state_dict()`
    save and restore the exact data position in checkpoints. Iterating yields the collated batches unchanged.
    `batch_size` None: the dataset yields whole batches itself (`t2i.data.bucket_batches.BucketBatcher`).
    """

    def __init__(self, dataset: Any, batch_size: int | None, num_workers: int = 0, seed: int = 0) -> None:
        from torch.utils.data import DataLoader

        self.dataset = dataset
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(seed),
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            self.dataset.observe(batch)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)

    def data_stats(self) -> dict[str, int]:
        """Skipped-sample counters by reason (what `DiffusionTask.data_stats` reports)."""
        stats = self.dataset.stats
        return {f"skipped_{reason}": int(count) for reason, count in stats.counts.items() if count} | {
            "skipped": int(sum(stats.counts.values()))
        }
