"""Precached shards: VAE latent moments and text embeddings stored instead of pixels and captions.

Format (one webdataset sample per image; every tensor blob is safetensors bytes, never pickle):
- ``{key}.image_encoded``: safetensors with ``mean`` and ``logvar``, each (C, h, w): the first stage's
  *unscaled* moments (`encode_moments`), so the trainer samples ``z = mean + exp(logvar / 2) * noise`` and
  applies the scale factor itself (`z_from_moments`).
- ``{key}.captions_encoded``: safetensors with ``embeddings`` (T, D), ``mask`` (T,) bool (True = real token)
  and optionally ``pooled`` (D,).
- ``{key}.txt``: the caption (for sample prompts and debugging).

The ``image_encoded`` blob may also hold the image's micro-conditioning (``original_size_as_tuple``,
``crop_coords_top_left``, ``target_size_as_tuple``, each (2,) int64; `t2i.data.buckets`), which readers return as
top-level entries like online batches. Readers yield ``{"image_encoded": {"mean", "logvar"},
"captions_encoded": {"embeddings", "mask"[, "pooled"]}, "captions": str[, "original_size_as_tuple", ...]}``;
the DataLoader's default collate stacks the inner tensors to (B, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from t2i.data.buckets import MICRO_CONDITIONING
from t2i.data.readers import ShardDataset, default_rank
from t2i.data.sources import resolve_sources
from t2i.data.stats import BadSample, DataStats
from t2i.errors import InvalidInputError

IMAGE_ENCODED = "image_encoded"
CAPTIONS_ENCODED = "captions_encoded"


def encode_precached_sample(
    key: str,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    embeddings: torch.Tensor,
    mask: torch.Tensor,
    caption: str | None = None,
    pooled: torch.Tensor | None = None,
    micro: dict[str, torch.Tensor] | None = None,
    more_text: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Tar members of one precached sample, ready for ``webdataset.TarWriter.write``.

    Shapes: mean/logvar (C, h, w), embeddings (T, D), mask (T,), pooled (D,); `micro` = the image's
    micro-conditioning (`t2i.data.buckets.MICRO_CONDITIONING`, each (2,)), stored beside the moments; `more_text` =
    more text tensors stored beside the embeddings (SDXL's second encoder: `embeddings_1`, `mask_1`, `pooled_1`).
    Tensors are stored as given (dtype kept), made contiguous and moved to CPU.
    """
    if mean.shape != logvar.shape or embeddings.shape[0] != mask.shape[0]:
        raise InvalidInputError(
            f"precache {key}: mean {tuple(mean.shape)} / logvar {tuple(logvar.shape)} and embeddings "
            f"{tuple(embeddings.shape)} / mask {tuple(mask.shape)} must agree"
        )
    moments = {"mean": mean, "logvar": logvar} | (micro or {})
    extra = {k: v.bool() if k.startswith("mask") else v for k, v in (more_text or {}).items()}
    text = {"embeddings": embeddings, "mask": mask.bool()} | ({"pooled": pooled} if pooled is not None else {}) | extra
    sample = {
        "__key__": key,
        IMAGE_ENCODED: save_tensors({k: v.detach().cpu().contiguous() for k, v in moments.items()}),
        CAPTIONS_ENCODED: save_tensors({k: v.detach().cpu().contiguous() for k, v in text.items()}),
    }
    if caption is not None:
        sample["txt"] = caption
    return sample


def write_precached_sample(writer, key: str, **tensors) -> None:
    """Write one sample through a ``webdataset.TarWriter``; arguments as `encode_precached_sample`."""
    writer.write(encode_precached_sample(key, **tensors))


class PrecachedShardWriter:
    """Writes precached samples into ``{out}/{prefix}-00000.tar``, starting a new shard every `shard_size`.

    Use as a context manager; `paths` lists the shards written.
    """

    def __init__(self, out: str | Path, shard_size: int = 1000, prefix: str = "precached") -> None:
        if shard_size < 1:
            raise InvalidInputError(f"shard_size: expected >= 1, got {shard_size}")
        self.out, self.shard_size, self.prefix = Path(out), shard_size, prefix
        self.out.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path] = []
        self._writer = None
        self._count = 0

    def write(self, key: str, **tensors) -> None:
        """Append one sample (arguments of `encode_precached_sample`)."""
        import webdataset as wds

        if self._count % self.shard_size == 0:
            self.close()
            self.paths.append(self.out / f"{self.prefix}-{len(self.paths):05d}.tar")
            self._writer = wds.TarWriter(str(self.paths[-1]))
        write_precached_sample(self._writer, key, **tensors)
        self._count += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> PrecachedShardWriter:  # noqa: PYI034 (no Self on Python 3.10)
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _load_blob(raw: dict, ext: str, missing_reason: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
    if ext not in raw:
        raise BadSample(missing_reason, f"{raw['__url__']}: {raw['__key__']} has no .{ext}")
    try:
        tensors = load_tensors(raw[ext])
    except (SafetensorError, ValueError, RuntimeError) as exn:
        raise BadSample("corrupt_member", f"{raw['__key__']}.{ext}: {exn}") from None
    if not set(names) <= set(tensors):
        raise BadSample(
            "corrupt_member", f"{raw['__key__']}.{ext}: has {sorted(tensors)}, expected {list(names)}"
        )
    return tensors


@dataclass(frozen=True)
class PrecachedDecoder:
    """Raw precached sample -> ``{"image_encoded", "captions_encoded", "captions"}``, or BadSample."""

    def expects(self) -> str:
        """What a usable sample looks like (for the error when none is found)."""
        return (f"expected precached samples (.{IMAGE_ENCODED} and .{CAPTIONS_ENCODED}, as `t2i precache` writes "
                "them); image shards need the model's image and caption keys, not the precached ones")

    def __call__(self, raw: dict, rng: np.random.Generator) -> dict:
        moments = _load_blob(raw, IMAGE_ENCODED, "missing_image", ("mean", "logvar"))
        text = _load_blob(raw, CAPTIONS_ENCODED, "missing_caption", ("embeddings", "mask"))
        text["mask"] = text["mask"].bool()
        caption = raw["txt"].decode("utf-8", errors="replace").strip() if "txt" in raw else ""
        micro = {k: moments.pop(k) for k in MICRO_CONDITIONING if k in moments}  # top-level, as online batches
        return {IMAGE_ENCODED: moments, CAPTIONS_ENCODED: text, "captions": caption} | micro


def build_precached_dataset(
    sources: str | Path | Sequence[str | Path],
    *,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle: bool = True,
    shuffle_buffer: int = 1000,
    repeat: bool = False,
    cache_in_memory: bool = False,
) -> ShardDataset:
    """Dataset over precached shards; same splitting, resume and stats as `build_dataset`."""
    stats = DataStats()
    units = resolve_sources(sources, stats)
    rank, world_size = default_rank(rank, world_size)
    return ShardDataset(
        units, PrecachedDecoder(), seed=seed, rank=rank, world_size=world_size, shuffle=shuffle,
        shuffle_buffer=shuffle_buffer, repeat=repeat, base_stats=stats, cache_in_memory=cache_in_memory,
    )  # fmt: skip
