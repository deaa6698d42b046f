"""Evaluating a stream of images in one pass: reference features (with an ``.npz`` cache), and the running
features / CLIP scores of generated (or given) images, batch by batch, so memory stays constant."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image

from t2i.data.stats import DataStats
from t2i.errors import InvalidInputError
from t2i.metrics.features import FeatureExtractor, extract_features
from t2i.metrics.images import count_images, iter_images
from t2i.metrics.stats import FeatureSet, frechet_distance, kernel_inception_distance

T = TypeVar("T")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


@dataclass
class Reference:
    """Reference features, the captions read with them (None when loaded from a cache) and skip counts."""

    features: FeatureSet
    captions: list[str | None] | None
    stats: DataStats = field(default_factory=DataStats)


def reference_features(
    extractor: FeatureExtractor,
    source: str | Path | None,
    cache: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 50,
    progress: bool = True,
) -> Reference:
    """Features of the reference images in `source` (at most `limit`), read from `cache` when that file exists
    (it must come from the same extractor) and written there otherwise."""
    if cache is not None and Path(cache).is_file():
        return Reference(FeatureSet.load(cache, expected_extractor=extractor.name), None)
    if source is None:
        raise InvalidInputError(
            "reference: no reference images given (and no reference features file to read)"
        )
    stats = DataStats()
    captions: list[str | None] = []

    def images() -> Iterator[Image.Image]:
        for item in iter_images(source, stats, limit):
            captions.append(item.caption)
            yield item.image

    known = count_images(source)
    total = min(known, limit) if known is not None and limit is not None else known
    features = extract_features(
        extractor, images(), batch_size, total, desc="reference features", progress=progress
    )
    result = Reference(FeatureSet(features, extractor.name), captions, stats)
    if cache is not None:
        result.features.save(cache)
    return result


class StreamingScores:
    """Collects features (for FID / KID) and CLIP scores batch by batch; `results` computes the metrics."""

    def __init__(self, extractor: FeatureExtractor | None = None, clip_scorer: Any = None) -> None:
        self.extractor, self.clip_scorer = extractor, clip_scorer
        self.features: list[torch.Tensor] = []
        self.clip_scores: list[torch.Tensor] = []
        self.count = 0

    def add(self, images: Sequence[Image.Image], prompts: Sequence[str | None] | None = None) -> None:
        """Add one batch; `prompts` (one per image) are needed only with a CLIP scorer."""
        if self.extractor is not None:
            self.features.append(self.extractor(images))
        if self.clip_scorer is not None:
            if prompts is None or any(p is None for p in prompts):
                raise InvalidInputError("CLIP score: every image needs a prompt (captions or --prompts)")
            self.clip_scores.append(self.clip_scorer.scores(images, prompts))
        self.count += len(images)

    def results(
        self,
        reference: FeatureSet | None = None,
        fid: bool = False,
        kid: bool = False,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        seed: int = 0,
    ) -> dict[str, float]:
        """``{"fid", "kid_mean", "kid_std", "kid_subset_size", "clip_score", "n"}`` for what was requested.

        KID's subset size is cut to the smaller set when needed (the estimate stays unbiased; its spread grows).
        """
        out: dict[str, float] = {"n": float(self.count)}
        if fid or kid:
            if reference is None or not self.features:
                raise InvalidInputError("FID/KID: need reference features and generated features")
            fake = torch.cat(self.features)
            if fid:
                out["fid"] = frechet_distance(reference.features, fake)
            if kid:
                size = min(kid_subset_size, len(reference), len(fake))
                out["kid_mean"], out["kid_std"] = kernel_inception_distance(
                    reference.features, fake, kid_subsets, size, seed
                )
                out["kid_subset_size"] = float(size)
        if self.clip_scorer is not None and self.clip_scores:
            out["clip_score"] = float(torch.cat(self.clip_scores).mean())
        return out
