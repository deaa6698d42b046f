"""Single-bucket batches from a `ShardDataset`'s sample stream, with the assembly state for exact resume, and the
bucket census logged at the start of a run.

`BucketBatcher(samples, batch_size)` is an IterableDataset of collated batches (use it with
``DataLoader(batcher, batch_size=None)``). Each DataLoader worker (and each rank: the `ShardDataset` is already
split by rank and worker) keeps one pending list per bucket; a sample joins its bucket's list and a list that
reaches `batch_size` becomes a batch. Samples wait in their list across epochs, so no sample is dropped and every
batch holds one bucket. ``flush_partial=True`` also yields the partial lists when a finite pass ends (precache).

Resume. A batch's ``__data__`` carries its worker, the read head (epoch, index of the last sample the worker had
read) and the positions of the samples still pending in that worker's lists. `observe` keeps the latest per
worker; `state_dict()` is a `ShardDataset` state (heads as the worker positions, so an unbucketed reader can still
continue after them) plus ``pending``. `load_state_dict` restarts each worker just before its oldest pending
sample and passes over (without decoding) every sample up to the head that is not pending: the lists are rebuilt
exactly, in their original order, and the next batch is the one the interrupted run would have made. Exact when
world_size and num_workers match, like the reader it wraps.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from t2i.data.buckets import Bucket, nearest_bucket, sample_bucket

Position = tuple[int, int]  # (epoch, index) of a sample in its worker's raw stream


class BucketBatcher(IterableDataset):
    """Batches of `batch_size` samples of one bucket each; see the module docstring for order and resume."""

    def __init__(self, samples: Any, batch_size: int, flush_partial: bool = False) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.samples, self.batch_size, self.flush_partial = samples, batch_size, flush_partial
        self._heads: dict[int, Position] = {}
        self._pending: dict[int, list[Position]] = {}
        self._num_workers: int | None = None
        self._next_worker = 0
        self._replay: dict[
            int, tuple[Position, frozenset[Position]]
        ] = {}  # worker -> (head, pending) to rebuild
        self._saved_layout: tuple[int, int | None] | None = (
            None  # (world_size, num_workers) of the resumed run
        )

    # ---- what the loader and the trainer use ------------------------------------------------------
    @property
    def stats(self) -> Any:
        return self.samples.stats

    @property
    def epoch(self) -> int:
        return self.samples.epoch

    def set_epoch(self, epoch: int) -> None:
        self.samples.set_epoch(epoch)

    def observe(self, batch: dict) -> None:
        """Record the assembly state that came with a batch the trainer consumed."""
        data = batch["__data__"]
        worker = int(data["worker"])
        self._heads[worker] = (int(data["epoch"]), int(data["index"]))
        self._pending[worker] = [(int(e), int(i)) for e, i in data["pending"]]
        self._num_workers = int(data["workers"])
        self._next_worker = (worker + 1) % self._num_workers

    def state_dict(self) -> dict:
        """``{"epoch", "world_size", "num_workers", "next_worker", "workers": {w: head}, "pending": {w: [...]}}``."""
        epochs = [e for e, _ in self._heads.values()] or [self.samples.epoch]
        return {
            "epoch": int(min(epochs)),
            "world_size": self.samples.world_size,
            "num_workers": self._num_workers,
            "next_worker": self._next_worker,
            "workers": {w: [e, i] for w, (e, i) in self._heads.items()},
            "pending": {w: [[e, i] for e, i in positions] for w, positions in self._pending.items()},
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a position from `state_dict` (a plain `ShardDataset` state resumes with empty lists)."""
        heads = {int(w): (int(e), int(i)) for w, (e, i) in state["workers"].items()}
        pending = {
            int(w): sorted((int(e), int(i)) for e, i in ps) for w, ps in state.get("pending", {}).items()
        }
        restart = {w: (pending[w][0][0], pending[w][0][1] - 1) if pending.get(w) else head
                   for w, head in heads.items()}  # fmt: skip
        epoch = min((e for e, _ in restart.values()), default=int(state["epoch"]))
        self.samples.load_state_dict({**state, "epoch": epoch, "workers": restart})
        self._heads, self._pending = dict(heads), {w: list(p) for w, p in pending.items()}
        self._num_workers, self._next_worker = state.get("num_workers"), int(state.get("next_worker", 0))
        self._replay = {w: (heads[w], frozenset(pending.get(w, ()))) for w in heads}
        self._saved_layout = (int(state["world_size"]), state.get("num_workers"))

    # ---- iteration (runs in the DataLoader worker) ---------------------------------------------------
    def _passed_over(self, worker: int, epoch: int, index: int) -> bool:
        """True for a sample that a resumed worker had already batched (read before its head, not pending)."""
        replay = self._replay.get(worker)
        if replay is None:
            return False
        head, pending = replay
        return (epoch, index) <= head and (epoch, index) not in pending

    def _replay_applies(self) -> bool:
        info = get_worker_info()
        num_workers = info.num_workers if info is not None else 1
        if self._saved_layout is None:
            return False
        world_size, saved_workers = self._saved_layout
        return world_size == self.samples.world_size and saved_workers in (None, num_workers)

    def __iter__(self) -> Iterator[dict]:
        self.samples.skip_sample = self._passed_over if self._replay and self._replay_applies() else None
        lists: dict[tuple[int, ...], list[dict]] = {}
        last: dict | None = None
        for sample in self.samples:
            last = sample["__data__"]
            key = sample_bucket(sample)
            group = lists.setdefault(key, [])
            group.append(sample)
            if len(group) == self.batch_size:
                lists[key] = []
                yield self._batch(group, last, lists)
        if self.flush_partial and last is not None:
            for key in sorted(lists):
                group, lists[key] = lists[key], []
                if group:
                    yield self._batch(group, last, lists)

    def _batch(self, group: list[dict], head: dict, lists: dict[tuple[int, ...], list[dict]]) -> dict:
        pending = sorted((s["__data__"]["epoch"], s["__data__"]["index"]) for g in lists.values() for s in g)
        batch = default_collate([{k: v for k, v in s.items() if k != "__data__"} for s in group])
        batch["__data__"] = {
            "worker": head["worker"],
            "workers": head["workers"],
            "epoch": head["epoch"],
            "index": head["index"],
            "pending": [list(p) for p in pending],
        }
        return batch


# ------------------------------------------------------------------------------------------------ census


def image_size_of(raw: dict, image_keys: Sequence[str]) -> tuple[int, int] | None:
    """(width, height) from an image's header (no pixel decode), or None when the sample has no readable image."""
    import io

    from PIL import Image

    try:
        for ext in image_keys:
            if ext in raw:
                with Image.open(io.BytesIO(raw[ext])) as image:
                    return image.size
        if "__path__" in raw:
            with Image.open(raw["__path__"]) as image:
                return image.size
    except Exception:  # noqa: BLE001 -- a bad image is the reader's to count; the census just leaves it out
        return None
    return None


def latent_size_of(raw: dict) -> tuple[int, int] | None:
    """(width, height) of a precached sample's latents from the safetensors header of its ``image_encoded``."""
    blob = raw.get("image_encoded")
    if blob is None or len(blob) < 8:
        return None
    try:
        length = int.from_bytes(blob[:8], "little")
        shape = json.loads(blob[8 : 8 + length])["mean"]["shape"]
        return int(shape[-1]), int(shape[-2])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def bucket_census(
    units: Sequence[Any], buckets: Sequence[Bucket] | None, image_keys: Sequence[str], latent_factor: int = 1
) -> tuple[Counter, float]:
    """({(width, height): count}, seconds) over every sample of `units`, reading headers only.

    Images count towards their nearest bucket of `buckets`; precached samples (`buckets` None) towards their
    latents' size x `latent_factor` (the pixel size they were encoded at).
    """
    from t2i.data.sources import iter_unit
    from t2i.data.stats import DataStats

    started, counts = time.perf_counter(), Counter()
    for unit in units:
        for raw in iter_unit(unit, DataStats()):
            if buckets is None:
                size = latent_size_of(raw)
                size = None if size is None else (size[0] * latent_factor, size[1] * latent_factor)
            else:
                size = image_size_of(raw, image_keys)
                size = None if size is None else nearest_bucket(*size, buckets)
            if size is not None:
                counts[size] += 1
    return counts, time.perf_counter() - started


def format_census(counts: Counter, seconds: float, batch_size: int) -> str:
    """A few lines: the number of samples per bucket (tallest first), flagging buckets below one batch."""
    total = sum(counts.values())
    lines = [f"buckets: {total} samples in {len(counts)} buckets (header scan {seconds:.1f} s)"]
    for (w, h), n in sorted(counts.items(), key=lambda item: item[0][0] / item[0][1]):
        note = f"  (fewer than batch_size {batch_size}: its batches repeat images)" if n < batch_size else ""
        lines.append(f"  {w}x{h} (aspect {w / h:.2f}): {n}{note}")
    return "\n".join(lines)


def counts_as_json(counts: Counter) -> dict[str, int]:
    """{"WIDTHxHEIGHT": count} (what precache writes into stats.json)."""
    return {f"{w}x{h}": int(n) for (w, h), n in sorted(counts.items(), key=lambda kv: kv[0][0] / kv[0][1])}


def census_from_json(counts: dict[str, int]) -> Counter:
    """Inverse of `counts_as_json`."""
    return Counter({tuple(int(v) for v in key.split("x")): int(n) for key, n in counts.items()})
