"""`data.buckets` for the latent families' training data: the bucket sizes of a run, the image transform that puts
images into them (with the crop recorded as micro-conditioning), the single-bucket batcher around a reader, and
the bucket census printed at the start of a run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from t2i.config import DataConfig
from t2i.data.bucket_batches import BucketBatcher, bucket_census, census_from_json, format_census
from t2i.data.buckets import Bucket, BucketTransform, make_buckets
from t2i.errors import ConfigError


def bucket_sizes(d: DataConfig) -> list[Bucket]:
    """The (width, height) buckets of `data.buckets` (one `resolution` square when buckets are off)."""
    b = d.buckets
    if b is None:
        return [(d.resolution, d.resolution)]
    return make_buckets(b.area(d.resolution), b.step, b.min_size, b.max_size, b.max_ratio, b.min_area)


def check_bucket_step(d: DataConfig, factor: int, key: str = "data.buckets.step") -> None:
    """Every bucket side must be a multiple of the model's pixel factor (VAE x UNet downsampling)."""
    if d.buckets is not None and d.buckets.step % factor:
        raise ConfigError(
            f"{key}: {d.buckets.step} is not a multiple of {factor}, the factor by which the model "
            "downsamples pixels; expected a multiple of it (64 for SD and SDXL)"
        )


def image_transform(d: DataConfig, micro_conditioning: bool) -> BucketTransform | None:
    """The reader's transform: a BucketTransform when bucketing or when the family needs the crop recorded
    (SDXL); None = the reader's default square `ImageTransform` (same pixels as one square bucket)."""
    if d.buckets is None and not micro_conditioning:
        return None
    return BucketTransform(tuple(bucket_sizes(d)), d.center_crop, d.random_flip)


def batched(dataset: Any, d: DataConfig) -> BucketBatcher | None:
    """`dataset` in single-bucket batches of `data.batch_size` when bucketing, else None (plain batching)."""
    return None if d.buckets is None else BucketBatcher(dataset, d.batch_size)


def print_census(dataset: Any, d: DataConfig, precached: bool, latent_factor: int) -> None:
    """Print the number of training images per bucket (from precache's stats.json when it has them)."""
    if d.buckets is None or not d.buckets.log_counts:
        return
    stored = stored_census(d.train) if precached else None
    if stored is not None:
        counts, seconds = stored, 0.0
    else:
        sizes = None if precached else bucket_sizes(d)
        image_keys = getattr(getattr(dataset, "decoder", None), "image_keys", ("jpg", "jpeg", "png", "webp"))
        counts, seconds = bucket_census(dataset.units, sizes, image_keys, latent_factor)
    b = d.buckets
    print(
        f"data.buckets: max_area {b.area(d.resolution)}, step {b.step}, sides {b.min_size}..{b.max_size}, "
        f"max_ratio {b.max_ratio}, min_area {b.min_area}; {len(bucket_sizes(d))} buckets",
        flush=True,
    )
    print(format_census(counts, seconds, d.batch_size), flush=True)


def stored_census(train: list[str]) -> Any:
    """The `buckets` counts of the stats.json that `t2i precache` wrote next to the first source, if any."""
    if not train:
        return None
    source = Path(str(train[0]))
    path = (source if source.is_dir() else source.parent) / "stats.json"
    if not path.is_file():
        return None
    counts = json.loads(path.read_text()).get("buckets")
    return census_from_json(counts) if counts else None
