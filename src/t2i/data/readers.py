"""Training datasets over webdataset shards and image folders: splitting, shuffling, bad data, exact resume.

Usage (trainer)::

    ds = build_dataset(cfg.data.train, cfg.data.resolution, seed=cfg.seed, rank=rank, world_size=world,
                       shuffle_buffer=cfg.data.shuffle_buffer, repeat=True)
    if resumed: ds.load_state_dict(ckpt["data"])          # before creating the DataLoader
    loader = DataLoader(ds, batch_size=..., num_workers=...)
    for batch in loader:
        ds.observe(batch)                                  # once per batch actually trained on
        ... batch["images"] (B, 3, H, W) in [-1, 1], batch["captions"] list[str] ...
    ckpt["data"] = ds.state_dict(); log(ds.stats.counts)

Each sample is ``{"images", "captions", "__key__", "__data__"}``; keys starting with ``__`` are bookkeeping.
``__data__`` = {worker, workers, epoch, index} locates the sample in its worker's raw stream.

Split. Per epoch the unit list (shards; an image folder is one unit) is permuted with ``(seed, epoch)``. With
at least ``world_size * num_workers`` units, global worker ``g = rank * num_workers + worker`` reads units
``g::total``; with fewer units every worker reads all of them and keeps samples ``g::total``. No
torch.distributed is needed: rank and world_size are plain arguments.

Order. Each worker shuffles its raw samples through a buffer seeded by (seed, epoch, g); random crop/flip
draw from a generator seeded by (seed, epoch, g, index). So the stream is a pure function of
(seed, epoch, rank, world_size, num_workers).

Resume. `observe` records, per worker, the (epoch, index) of the last sample the trainer used;
`state_dict()` returns it and `load_state_dict()` makes each worker skip the raw samples it had already
consumed (skipped samples are not decoded). Exact when world_size and num_workers match; otherwise the epoch
restarts with a warning. With ``repeat=False`` a pass is one epoch: call ``set_epoch(e)`` before each pass
(after a resume, start with ``set_epoch(ds.epoch)``). With ``repeat=True`` one iterator runs epoch after epoch.

No usable data. An endless dataset (``repeat=True``) whose worker gets nothing in a whole epoch checks, by
reading every unit once, that a later epoch can give it something; if not it raises a one-line `DataError`
with the skip counts by reason and what a usable sample looks like (instead of spinning forever).

Bad data. ``ds.stats`` (a `DataStats`) = missing shards found when resolving sources + the counts of every
pass, live: passes in this process (num_workers=0) and in DataLoader worker processes (num_workers>0) add to
one counter in shared memory. Counts accumulate over passes: a bad sample read twice counts twice. Names of
shards that fail at run time are listed in ``ds.stats.unreadable_shards`` for in-process passes; worker
processes log them (once per pass) instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from t2i.data.sources import Unit, iter_unit, resolve_sources
from t2i.data.stats import BadSample, DataStats, SharedCounts
from t2i.data.transforms import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLarge, ImageTransform, decode_image
from t2i.errors import DataError

log = logging.getLogger("t2i.data")

IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
# `data.caption_key`: tar member extensions, `json:FIELD` (a field of the sample's .json, as img2dataset writes
# it), or, for image folders, metadata.jsonl columns (`json:FIELD` and a bare `FIELD` both name column FIELD).
CAPTION_KEYS: tuple[str, ...] = ("txt", "json:caption", "caption", "text")

Decoder = Callable[[dict, np.random.Generator], dict]


def caption_of(raw: dict, caption_keys: Sequence[str] = CAPTION_KEYS) -> str:
    """The caption of a raw sample: the first of `caption_keys` that it has.

    BadSample(missing_caption) when it has none, BadSample(corrupt_member) when that member is not UTF-8
    (or its .json does not parse).
    """
    for key in caption_keys:
        text = _caption_candidate(raw, key)
        if text is not None:
            return text.strip()
    raise BadSample(
        "missing_caption", f"{raw['__url__']}: {raw['__key__']} has no caption (looked for {', '.join(caption_keys)})"
    )


def _caption_candidate(raw: dict, key: str) -> str | None:
    meta = raw.get("__meta__")  # image-folder columns
    field = key.removeprefix("json:")
    if meta is None and key.startswith("json:"):
        meta = _json_member(raw)
    if meta is not None:
        value = meta.get(field) if isinstance(meta, dict) else None
        if not isinstance(value, str):
            return None
        try:
            value.encode("utf-8")  # a JSON escape such as \ud800 is not text
        except UnicodeEncodeError:
            raise BadSample("corrupt_member", f"{raw['__key__']}: {key} is not valid Unicode") from None
        return value
    if key not in raw or key.startswith("__"):
        return None
    try:
        return raw[key].decode("utf-8")
    except UnicodeDecodeError as exn:
        raise BadSample("corrupt_member", f"{raw['__key__']}.{key}: {exn}") from None


def _json_member(raw: dict) -> dict | None:
    if "json" not in raw:
        return None
    try:
        value = json.loads(raw["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise BadSample("corrupt_member", f"{raw['__key__']}.json: {exn}") from None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class ImageDecoder:
    """Raw sample -> ``{"images": (3, R, R) in [-1, 1], "captions": str}``, or BadSample.

    Images that would decode to more than `max_pixels` pixels are skipped as ``too_large`` (large JPEGs are
    first decoded at a reduced scale, see `decode_image`).
    """

    transform: Callable[..., Any]  # (PIL image, rng) -> tensor (ImageTransform) or dict (BucketTransform)
    image_keys: tuple[str, ...] = IMAGE_KEYS
    caption_keys: tuple[str, ...] = CAPTION_KEYS
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    def expects(self) -> str:
        """What a usable sample looks like (for the error when none is found)."""
        images = "/".join(f".{k}" for k in self.image_keys)
        return f"expected image samples ({images}) with a caption ({', '.join(self.caption_keys)})"

    def _image_bytes(self, raw: dict) -> bytes:
        for ext in self.image_keys:
            if ext in raw:
                return raw[ext]
        if "__path__" in raw:
            try:
                return Path(raw["__path__"]).read_bytes()
            except OSError as exn:
                raise BadSample("missing_image", str(exn)) from None
        raise BadSample(
            "missing_image", f"{raw['__url__']}: {raw['__key__']} has no {'/'.join(self.image_keys)}"
        )

    def __call__(self, raw: dict, rng: np.random.Generator) -> dict:
        data = self._image_bytes(raw)
        caption = caption_of(raw, self.caption_keys)
        try:
            image = decode_image(data, self.transform.resolution, self.max_pixels)
        except ImageTooLarge as exn:
            raise BadSample("too_large", f"{raw['__url__']}: {raw['__key__']}: {exn}") from None
        except Exception as exn:  # noqa: BLE001 -- PIL raises many exception types for bad bytes
            raise BadSample("undecodable", f"{raw['__url__']}: {raw['__key__']}: {exn}") from None
        out = self.transform(image, rng)  # a tensor, or a dict with "images" (+ micro-conditioning)
        return (out if isinstance(out, dict) else {"images": out}) | {"captions": caption}


def _shuffled(items: Iterator[dict], buffer_size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Reservoir-style shuffle buffer (as webdataset's `shuffle`), deterministic given `rng`."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list[dict] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = int(rng.integers(buffer_size))
        buffer[j], item = item, buffer[j]
        yield item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


def _as_list(value) -> list:
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).tolist()
    return list(value) if isinstance(value, (list, tuple)) else [value]


class _FailureWatch:
    """Forwards shard-level failures to `target` (None: drops them) and remembers that one happened."""

    def __init__(self, target: DataStats | None) -> None:
        self.target, self.failed = target, False

    def add(self, reason: str, detail: str = "", shard: str | None = None) -> None:
        self.failed = True
        if self.target is not None:
            self.target.add(reason, detail, shard=shard)


class ShardDataset(IterableDataset):
    """Iterable dataset over resolved units; see the module docstring for split, order, resume and stats."""

    def __init__(
        self,
        units: list[Unit],
        decoder: Decoder,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        repeat: bool = False,
        base_stats: DataStats | None = None,
        cache_in_memory: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.units, self.decoder = units, decoder
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.shuffle_buffer, self.repeat = shuffle, shuffle_buffer, repeat
        self.epoch = 0
        self._base = base_stats or DataStats()
        self._local: list[DataStats] = []  # passes run in this process
        self._shared: SharedCounts | None = SharedCounts()  # every pass, any process
        self._positions: dict[int, tuple[int, int]] = {}  # worker -> (epoch, index) last consumed
        self._num_workers: int | None = None
        self._next_worker = 0  # the DataLoader asks workers round-robin; resume starts at this one
        self._resume: dict | None = None
        # (worker, epoch, index) -> True: pass over that raw sample without decoding it (bucket resume)
        self.skip_sample: Callable[[int, int, int], bool] | None = None
        # unit path -> its raw samples, kept after a clean first read so later epochs skip the tar parsing
        self._cached_units: dict[str, list[dict]] | None = {} if cache_in_memory else None

    # ---- bookkeeping the trainer uses -------------------------------------------------------------
    @property
    def stats(self) -> DataStats:
        """Skip counts so far, from all passes (in this process and in DataLoader workers)."""
        names = DataStats(unreadable_shards=[n for p in self._local for n in p.unreadable_shards])
        if self._shared is None:
            return self._base.merged(*self._local)
        return self._base.merged(self._shared.as_stats(), names)

    def __getstate__(self) -> dict:
        from multiprocessing.context import get_spawning_popen

        state = dict(self.__dict__)
        if get_spawning_popen() is None:  # shared memory only travels to a process being started
            state["_shared"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next pass (its shard order, shuffle and augmentation)."""
        self.epoch = epoch

    def observe(self, batch: dict) -> None:
        """Record the data position of a (collated) batch the trainer consumed; needed for `state_dict`."""
        meta = {k: _as_list(v) for k, v in batch["__data__"].items()}
        for worker, workers, epoch, index in zip(
            meta["worker"], meta["workers"], meta["epoch"], meta["index"]
        ):
            position = (epoch, index)
            self._positions[worker] = max(self._positions.get(worker, position), position)
            self._num_workers = workers
            self._next_worker = (worker + 1) % workers

    def state_dict(self) -> dict:
        """Data position: ``{"epoch", "world_size", "num_workers", "workers": {worker: [epoch, index]}}``."""
        epochs = [e for e, _ in self._positions.values()] or [self.epoch]
        return {
            "epoch": int(min(epochs)),
            "world_size": self.world_size,
            "num_workers": self._num_workers,
            "next_worker": self._next_worker,
            "workers": {int(w): [int(e), int(i)] for w, (e, i) in self._positions.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a position from `state_dict` (call before creating the DataLoader).

        The positions apply to passes of epoch ``state["epoch"]`` (= ``self.epoch`` afterwards).
        """
        self._resume = {
            "epoch": int(state["epoch"]),
            "world_size": int(state["world_size"]),
            "num_workers": state.get("num_workers"),
            "next_worker": int(state.get("next_worker", 0)),
            "workers": {int(w): (int(e), int(i)) for w, (e, i) in state["workers"].items()},
        }
        self.epoch = self._resume["epoch"]
        self._positions = dict(self._resume["workers"])
        self._num_workers = self._resume["num_workers"]
        self._next_worker = self._resume["next_worker"]

    # ---- iteration -------------------------------------------------------------------------------
    def _resume_applies(self, num_workers: int) -> bool:
        r = self._resume
        if r is None or r["epoch"] != self.epoch:
            return False
        if r["num_workers"] not in (None, num_workers) or r["world_size"] != self.world_size:
            log.warning(
                "data resume: saved world_size/num_workers %s/%s differ from %s/%s; restarting epoch %d",
                r["world_size"],
                r["num_workers"],
                self.world_size,
                num_workers,
                self.epoch,
            )
            return False
        return True

    def _start(self, loader_worker: int, num_workers: int) -> tuple[int, int, int]:
        """(logical worker id, epoch, raw samples to skip) at which this DataLoader worker starts.

        After a resume, DataLoader worker 0 plays the logical worker that was due next, so batches come
        in the same round-robin order as in the interrupted run.
        """
        if not self._resume_applies(num_workers):
            return loader_worker, self.epoch, 0
        r = self._resume
        worker = (loader_worker + r["next_worker"]) % num_workers
        epoch, index = r["workers"].get(worker, (self.epoch, 0))
        if epoch == self.epoch or (epoch > self.epoch and self.repeat):
            return worker, epoch, index
        return worker, self.epoch, 0

    def _epoch_units(self, epoch: int) -> list[Unit]:
        if not self.shuffle:
            return list(self.units)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        return [self.units[i] for i in order]

    def _unit_samples(self, unit: Unit, stats: DataStats, count_stream_errors: bool = True) -> Iterator[dict]:
        """Raw samples of `unit`, from memory when `cache_in_memory` already holds a clean read of it."""
        if self._cached_units is None:
            yield from iter_unit(unit, stats, count_stream_errors)
            return
        if unit.path in self._cached_units:
            yield from self._cached_units[unit.path]
            return
        sink = _FailureWatch(stats if count_stream_errors else None)
        samples = []
        for raw in iter_unit(unit, sink):  # type: ignore[arg-type]  (only `add` is called)
            samples.append(raw)
            yield raw
        if not sink.failed:  # a unit that failed to read is read again, and counted, on every pass
            self._cached_units[unit.path] = samples

    def _raw_stream(self, epoch: int, gid: int, total: int, stats: DataStats) -> Iterator[dict]:
        units = self._epoch_units(epoch)
        if len(units) >= total:
            for unit in units[gid::total]:
                yield from self._unit_samples(unit, stats)
            return
        count = 0
        for unit in units:
            for raw in self._unit_samples(unit, stats, count_stream_errors=gid == 0):
                if count % total == gid:
                    yield raw
                count += 1

    def _iter_epoch(self, epoch: int, worker: int, num_workers: int, skip: int, stats: DataStats):
        """Yield this worker's samples of `epoch`; returns how many it yielded."""
        gid = self.rank * num_workers + worker
        total = self.world_size * num_workers
        raw = self._raw_stream(epoch, gid, total, stats)
        if self.shuffle:
            raw = _shuffled(raw, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, gid]))
        produced = 0
        for index, item in enumerate(raw, start=1):
            if index <= skip or (self.skip_sample is not None and self.skip_sample(worker, epoch, index)):
                continue
            try:
                sample = self._decode(item, np.random.default_rng([self.seed, epoch, gid, index]))
            except BadSample as bad:
                stats.add(bad.reason, bad.detail)
                continue
            sample["__key__"] = item["__key__"]
            sample["__data__"] = {"worker": worker, "workers": num_workers, "epoch": epoch, "index": index}
            produced += 1
            yield sample
        return produced

    def _decode(self, item: dict, rng: np.random.Generator) -> dict:
        if "__bad__" in item:
            raise BadSample(item["__bad__"], item.get("__detail__", f"{item['__url__']}: {item['__key__']}"))
        return self.decoder(item, rng)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shared, writer = self._shared, 0 if info is None else 1 + worker
        stats = DataStats(on_add=None if shared is None else lambda reason: shared.add(reason, writer))
        if info is None:
            self._local.append(stats)
        worker, epoch, skip = self._start(worker, num_workers)
        usable_checked = False
        while True:
            produced = yield from self._iter_epoch(epoch, worker, num_workers, skip, stats)
            if not self.repeat:
                return
            if produced == 0 and skip == 0 and not usable_checked:
                # An endless stream that yields nothing would spin forever: look once through every unit.
                self._require_usable(worker, num_workers)
                usable_checked = True
            epoch, skip = epoch + 1, 0

    def _require_usable(self, worker: int, num_workers: int) -> None:
        """Called when a whole epoch gave this worker nothing: DataError unless a later epoch can give it some.

        When units are split between readers, the next epoch's split differs, so one usable sample in any
        unit is enough; a probe reads the units once (no effect on the stream or on `stats`) to find it.
        When every reader takes every n-th sample of all units, this reader has just read them all: its share
        is empty and stays so, which is an error too.
        """
        readers = self.world_size * num_workers
        split_by_unit = len(self.units) >= readers
        found, probe = self._probe(limit=1 if split_by_unit else readers)
        if found and split_by_unit:
            return
        kinds = "shard" if all(u.kind == "tar" for u in self.units) else "shard/folder"
        where = f"{len(self.units)} {kinds}{'s' if len(self.units) != 1 else ''}"
        if found == 0:
            expects = self.decoder.expects() if hasattr(self.decoder, "expects") else "expected usable samples"
            raise DataError(f"data.train: no usable sample in one pass over {where}; skipped "
                            f"{self._base.merged(probe).summary()}; {expects}")
        count = f"{found}" if found < readers else f"at least {found}"
        raise DataError(f"data.train: rank {self.rank} DataLoader worker {worker} got no usable sample in a whole "
                        f"pass: {readers} readers (world_size x num_workers) deal out the samples of {where} in "
                        f"turn, and they hold {count} usable sample(s); use fewer workers or more data")

    def _probe(self, limit: int) -> tuple[int, DataStats]:
        """(usable samples found, up to `limit`; skip counts of what was read) over every unit once."""
        found, probe = 0, DataStats(quiet=True)
        for unit in self.units:
            for raw in iter_unit(unit, probe):
                try:
                    self._decode(raw, np.random.default_rng(0))
                except BadSample as bad:
                    probe.add(bad.reason, bad.detail)
                    continue
                found += 1
                if found >= limit:
                    return found, probe
        return found, probe


def default_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return rank or 0, world_size or 1


def build_dataset(
    sources: str | Path | Sequence[str | Path],
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    *,
    image_keys: Sequence[str] = IMAGE_KEYS,
    caption_keys: Sequence[str] = CAPTION_KEYS,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle: bool = True,
    shuffle_buffer: int = 1000,
    repeat: bool = False,
    transform: Callable[..., Any] | None = None,
    cache_in_memory: bool = False,
) -> ShardDataset:
    """Image-caption dataset over webdataset shards and/or image folders.

    Yields ``{"images": (3, resolution, resolution) float in [-1, 1], "captions": str, "__key__": str, ...}``.
    rank/world_size default to torch.distributed's when it is initialized, else 0/1. Raises DataError when
    a source matches nothing. `transform` replaces the square `ImageTransform(resolution, center_crop, random_flip)`
    (e.g. a `t2i.data.buckets.BucketTransform`, whose extra entries join the sample).
    """
    stats = DataStats()
    units = resolve_sources(sources, stats)
    if isinstance(caption_keys, str):
        caption_keys = [caption_keys]
    transform = transform or ImageTransform(resolution, center_crop, random_flip)
    decoder = ImageDecoder(transform, tuple(image_keys), tuple(caption_keys), max_image_pixels)
    rank, world_size = default_rank(rank, world_size)
    return ShardDataset(
        units, decoder, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle,
        shuffle_buffer=shuffle_buffer, repeat=repeat, base_stats=stats, cache_in_memory=cache_in_memory,
    )  # fmt: skip
