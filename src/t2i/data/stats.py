"""Bad-data accounting: bad samples are skipped and counted by reason, never raised."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("t2i.data")

# undecodable: image bytes PIL cannot decode (truncated, garbage).
# missing_caption / missing_image: a sample key without a caption / image member (or metadata entry/file).
# corrupt_member: a tar stream that breaks mid-shard, a duplicate member, a caption that is not UTF-8,
#   a metadata.jsonl line that is not JSON, a precached tensor blob that does not parse.
# unreadable_shard: a shard path that does not exist, cannot be opened, or is not a tar file.
# too_large: an image that would decode to more than data.max_image_pixels pixels (checked before decoding).
# unsafe_path: a metadata.jsonl file_name that leaves its folder (absolute, or `..` after normalisation).
REASONS: tuple[str, ...] = (
    "undecodable",
    "missing_caption",
    "missing_image",
    "corrupt_member",
    "unreadable_shard",
    "too_large",
    "unsafe_path",
)


class BadSample(Exception):
    """Raised by a sample decoder; `reason` is one of `REASONS`. Caught and counted by the reader."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _zero_counts() -> dict[str, int]:
    return dict.fromkeys(REASONS, 0)


@dataclass
class DataStats:
    """Counts of skipped samples by reason, plus the names of shards that could not be read."""

    counts: dict[str, int] = field(default_factory=_zero_counts)
    unreadable_shards: list[str] = field(default_factory=list)
    on_add: Callable[[str], None] | None = field(default=None, repr=False, compare=False)
    quiet: bool = field(default=False, repr=False, compare=False)  # log at DEBUG only (re-reads, probes)

    def add(self, reason: str, detail: str = "", shard: str | None = None) -> None:
        """Count one skipped item; the first of each reason is logged at WARNING, later ones at DEBUG."""
        first = self.counts[reason] == 0 and not self.quiet
        self.counts[reason] += 1
        if self.on_add is not None:
            self.on_add(reason)
        if shard is not None and reason == "unreadable_shard" and shard not in self.unreadable_shards:
            self.unreadable_shards.append(shard)
            log.log(logging.DEBUG if self.quiet else logging.WARNING, "skipping unreadable shard %s (%s)", shard,
                    detail)
            return
        log.log(logging.WARNING if first else logging.DEBUG, "skipping bad sample (%s): %s", reason, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """``"12 (undecodable 10, unreadable_shard 2)"``: the total and the non-zero reasons."""
        parts = [f"{reason} {n}" for reason, n in self.counts.items() if n]
        return f"{self.total} ({', '.join(parts)})" if parts else "0"

    def merged(self, *others: DataStats) -> DataStats:
        """A new DataStats with the counts summed and shard names united."""
        out = DataStats(dict(self.counts), list(self.unreadable_shards))
        for other in others:
            for reason, n in other.counts.items():
                out.counts[reason] = out.counts.get(reason, 0) + n
            out.unreadable_shards += [s for s in other.unreadable_shards if s not in out.unreadable_shards]
        return out

    def as_dict(self) -> dict:
        """JSON-able form: ``{"counts": {...}, "unreadable_shards": [...]}``."""
        return {"counts": dict(self.counts), "unreadable_shards": list(self.unreadable_shards)}


class SharedCounts:
    """Skip counts in shared memory, so DataLoader worker processes report to the main process.

    One row per writer (row 0: the main process, row 1 + i: DataLoader worker i), so no lock is needed and
    it works under fork and spawn alike. Workers receive it when the dataset is handed to them at process
    start; pickled in any other way it is dropped (see `ShardDataset.__getstate__`).
    """

    ROWS = 65

    def __init__(self) -> None:
        self.array = multiprocessing.RawArray(ctypes.c_int64, self.ROWS * len(REASONS))

    def add(self, reason: str, writer: int = 0) -> None:
        """Count one `reason` for writer `writer` (0 = main process, 1 + i = DataLoader worker i)."""
        self.array[(writer % self.ROWS) * len(REASONS) + REASONS.index(reason)] += 1

    def as_stats(self) -> DataStats:
        values = self.array[:]
        totals = [sum(values[i :: len(REASONS)]) for i in range(len(REASONS))]
        return DataStats(dict(zip(REASONS, totals)))
