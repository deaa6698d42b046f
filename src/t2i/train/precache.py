"""Precaching: run the frozen encoders over a dataset once and write shards the training loop reads instead.

- `precache(cfg, out)` (latent diffusion): `image_encoded` = VAE mean + logvar (+ the micro-conditioning:
  original size, crop top-left, target size), `captions_encoded` = per-token embeddings + mask of every text
  embedder (SDXL: CLIP-L's `embeddings`/`mask`, bigG's `embeddings_1`/`mask_1`/`pooled_1`), `txt` = caption; `stats.json` with the latent statistics and the `scale_factor` that gives
  the latents unit variance (what SD's 0.18215 is for its VAE); and `uncond.safetensors` (`embeddings` (T, D),
  the encoding of "") that the training task substitutes for dropped captions without loading the text encoder.
  A run reads them with `model.first_stage_key=image_encoded model.cond_stage_key=captions_encoded
  data.train=DIR`.
- the same for a flow model (`model.kind: flow`): the 16-channel VAE's moments, and for the single text
  embedder the context encoder's tokens (`embeddings`, `mask`) with the pooled vector of the pooled encoder (or
  the context encoder's own) as `pooled`; read with the same two keys.
- `precache_imagen(cfg, out)` (Imagen): pixels (the identity first stage's moments) at `data.resolution` and the
  stage's text embeddings, read with `model.conditioning.precached_key=embeddings
  model.conditioning.online_encoding=false data.train=DIR`. One precache at the largest stage's size serves every
  stage: each shrinks the pixels to its own size.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from t2i.data.buckets import MICRO_CONDITIONING
from t2i.errors import ConfigError


class CaptionCache:
    """Text encodings keyed by caption: each distinct caption runs through the encoder once."""

    def __init__(self, encoder: Any, max_entries: int = 100_000) -> None:
        self.encoder, self.max_entries = encoder, max_entries
        self.entries: dict[str, tuple[Any, Any, Any]] = {}

    def encode(self, captions: list[str]) -> list[tuple[Any, Any, Any]]:
        """(embeddings (T, D), mask (T,), pooled (P,)) per caption, on the CPU."""
        missing = sorted({c for c in captions if c not in self.entries})
        if missing:
            encoding = self.encoder.encode(missing)
            if len(self.entries) + len(missing) > self.max_entries:
                self.entries.clear()
            for i, caption in enumerate(missing):
                pooled = encoding.pooled[i].cpu() if encoding.pooled is not None else None
                self.entries[caption] = (encoding.embeddings[i].cpu(), encoding.mask[i].cpu(), pooled)
        return [self.entries[c] for c in captions]


class ContextAndPooled:
    """A flow model's two text encoders as one: the context encoder's tokens and mask, the pooled encoder's pooled
    vector (None: the context encoder's own)."""

    def __init__(self, context: Any, pooled: Any | None) -> None:
        self.context, self.pooled = context, pooled

    def encode(self, prompts: list[str]) -> Any:
        import dataclasses

        encoding = self.context.encode(prompts)
        if self.pooled is None:
            return encoding
        return dataclasses.replace(encoding, pooled=self.pooled.encode(prompts).pooled)


class TextCaches:
    """One `CaptionCache` per text embedder of a model (SDXL: CLIP-L, bigG; a flow model: one, context + pooled),
    and the precached tensors of a caption under `precached_keys(i)`: embeddings and mask for each, the pooled
    vector where it conditions."""

    def __init__(self, model_cfg: Any, device: Any) -> None:
        if model_cfg.kind == "flow":
            from t2i.pipelines.flux_folder import build_text

            pooled = build_text(model_cfg.pooled_encoder).to(device) if model_cfg.pooled_encoder else None
            self.caches = [CaptionCache(ContextAndPooled(build_text(model_cfg.context_encoder).to(device), pooled))]
            self.pooled = [True]
            return
        from t2i.train.tasks.latent_text import build_embedder_encoder, text_encoder_configs

        configs = list(text_encoder_configs(model_cfg).values())
        self.caches = [CaptionCache(build_embedder_encoder(c).to(device)) for c in configs]
        self.pooled = [c.always_return_pooled for c in configs]

    def tensors(self, captions: list[str], dtype: Any) -> list[dict[str, Any]]:
        """Per caption, {precached name: tensor} over every embedder (floats stored in `dtype`)."""
        from t2i.text.conditioner import precached_keys

        out: list[dict[str, Any]] = [{} for _ in captions]
        for index, (cache, pooled) in enumerate(zip(self.caches, self.pooled, strict=True)):
            keys = precached_keys(index)
            for entry, (embeddings, mask, vector) in zip(out, cache.encode(captions), strict=True):
                entry[keys["embeddings"]], entry[keys["mask"]] = embeddings.to(dtype), mask
                if pooled:
                    entry[keys["pooled"]] = vector.to(dtype)
        return out

    @property
    def distinct(self) -> int:
        return len(self.caches[0].entries)


def precache(cfg: Any, out: str | Path, batch_size: int = 64, shard_size: int = 2000,
             dtype: str = "float32") -> dict[str, Any]:
    """Encode `cfg.data.train` into precached shards under `out`; returns the statistics written to stats.json.

    Every sample also stores its micro-conditioning (original size, crop top-left, target size). With
    `data.buckets` each image is encoded at its bucket's size (batches of one bucket; the last partial batch of
    each bucket too) and stats.json counts the samples per bucket (`buckets`: {"WxH": n}).
    """
    import torch
    from tqdm.auto import tqdm

    from t2i.data.precached import PrecachedShardWriter
    from t2i.models.first_stage import LatentFirstStage

    if cfg.model.kind not in ("latent_diffusion", "flow"):
        raise ConfigError(f"model.kind: {cfg.model.kind!r}; precache needs latent_diffusion or flow")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    first_stage = LatentFirstStage(frozen_vae(cfg.model), cfg.model.scale_factor, cfg.model.shift_factor).to(device)
    texts = TextCaches(cfg.model, device)
    text_dtype = getattr(torch, dtype)
    totals = {"sum": 0.0, "squares": 0.0, "elements": 0}
    buckets: dict[str, int] = {}
    count, started = 0, time.perf_counter()
    with PrecachedShardWriter(out, shard_size) as writer, torch.no_grad():
        bar = tqdm(_precache_batches(cfg.data, batch_size), desc="precache", unit="batch", dynamic_ncols=True)
        for batch in bar:
            mean, logvar = first_stage.encode_moments(batch["images"].to(device))
            mean, logvar = mean.float().cpu(), logvar.float().cpu()
            for i, (key, text) in enumerate(zip(batch["__key__"], texts.tensors(batch["captions"], text_dtype))):
                micro = {k: batch[k][i] for k in MICRO_CONDITIONING}
                writer.write(key, mean=mean[i], logvar=logvar[i], embeddings=text.pop("embeddings"),
                             mask=text.pop("mask"), pooled=text.pop("pooled", None), more_text=text,
                             caption=batch["captions"][i], micro=micro)  # fmt: skip
            height, width = batch["images"].shape[-2:]
            buckets[f"{width}x{height}"] = buckets.get(f"{width}x{height}", 0) + mean.shape[0]
            totals["sum"] += float(mean.double().sum())
            totals["squares"] += float(mean.double().pow(2).sum())
            totals["elements"] += mean.numel()
            count += mean.shape[0]
            bar.set_postfix(samples_per_s=f"{count / (time.perf_counter() - started):.1f}", refresh=False)
        paths = list(writer.paths)
    if count == 0:
        raise ConfigError(f"data.train: {list(cfg.data.train)} yielded no samples to precache")
    latent_mean = totals["sum"] / totals["elements"]
    latent_std = max(totals["squares"] / totals["elements"] - latent_mean**2, 1e-12) ** 0.5
    stats = {
        "num_samples": count,
        "num_shards": len(paths),
        "shards": [p.name for p in paths],
        "latent_mean": latent_mean,
        "latent_std": latent_std,
        "scale_factor": 1.0 / latent_std,
        "distinct_captions": texts.distinct,
        "buckets": dict(sorted(buckets.items(), key=lambda kv: _aspect(kv[0]))),
        "seconds": time.perf_counter() - started,
    }
    stats["samples_per_s"] = count / max(stats["seconds"], 1e-9)
    (Path(out) / "stats.json").write_text(json.dumps(stats, indent=2))
    write_uncond(texts, Path(out), text_dtype)
    return stats


def frozen_vae(model_cfg: Any) -> Any:
    """The family's VAE as its training task loads it."""
    if model_cfg.kind == "flow":
        from t2i.train.tasks.flow import load_flow_vae

        if model_cfg.first_stage_config.from_pretrained is None:
            raise ConfigError("model.first_stage_config.from_pretrained: missing; precaching needs the trained VAE "
                              "(a diffusers or t2i VAE folder)")  # fmt: skip
        return load_flow_vae(model_cfg)
    from t2i.train.tasks.latent import load_vae

    return load_vae(model_cfg)


def _aspect(size: str) -> float:
    width, height = size.split("x")
    return int(width) / int(height)


def _precache_batches(d: Any, batch_size: int) -> Any:
    """Batches of `data.train` in file order: images with their micro-conditioning, one bucket per batch."""
    import dataclasses

    from torch.utils.data import DataLoader

    from t2i.data.bucket_batches import BucketBatcher
    from t2i.data.readers import build_dataset
    from t2i.train.bucketing import image_transform

    transform = image_transform(dataclasses.replace(d, random_flip=False), micro_conditioning=True)  # one pass
    dataset = build_dataset(d.train, d.resolution, d.center_crop, False, shuffle=False, rank=0, world_size=1,
                            transform=transform, caption_keys=d.caption_key,
                            max_image_pixels=d.max_image_pixels)  # fmt: skip
    if d.buckets is None:
        return DataLoader(dataset, batch_size=batch_size, num_workers=d.num_workers)
    return DataLoader(BucketBatcher(dataset, batch_size, flush_partial=True), batch_size=None,
                      num_workers=d.num_workers)  # fmt: skip


def write_uncond(texts: TextCaches, out: Path, dtype: Any) -> Path:
    """Save every text embedder's encoding of "" as `out/uncond.safetensors` under the shards' names
    (`embeddings` (T, D), `mask` (T,) [, `pooled`], `embeddings_1`, ...), in the shards' text dtype (the mask
    matters to models that mask padding tokens, such as flow models on MiniLM)."""
    from safetensors.torch import save_file

    from t2i.train.tasks.latent_text import UNCOND_FILE

    tensors = {k: v.contiguous() for k, v in texts.tensors([""], dtype)[0].items()}
    path = out / UNCOND_FILE
    save_file(tensors, str(path))
    return path


def precache_imagen(
    cfg: Any, out: str | Path, batch_size: int = 64, shard_size: int = 2000, dtype: str = "float16"
) -> dict[str, Any]:
    """Encode `cfg.data.train` into precached shards under `out`; returns the statistics written to stats.json.

    `dtype` is the storage type of pixels and embeddings (float16 halves the shards; pixels keep 8-bit accuracy).
    """
    import torch
    from torch.utils.data import DataLoader

    from t2i.data.precached import PrecachedShardWriter
    from t2i.data.readers import build_dataset
    from t2i.models.first_stage import IdentityFirstStage
    from t2i.pipelines.imagen_stage import stage_config
    from t2i.text.encoders import build_text_encoder

    if cfg.model.kind != "imagen":
        raise ConfigError(f"model.kind: {cfg.model.kind!r}; precache_imagen needs imagen")
    c = stage_config(cfg.model).conditioning
    encoder = build_text_encoder(c.encoder_kind, c.encoder_path, max_length=c.token_length)
    captions, first_stage = CaptionCache(encoder), IdentityFirstStage()
    d = cfg.data
    dataset = build_dataset(d.train, d.resolution, d.center_crop, False, caption_keys=d.caption_key,
                            max_image_pixels=d.max_image_pixels, shuffle=False, rank=0, world_size=1)
    store = getattr(torch, dtype)
    count, started = 0, time.perf_counter()
    with PrecachedShardWriter(out, shard_size) as writer, torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size, num_workers=d.num_workers):
            mean, logvar = first_stage.encode_moments(batch["images"])
            texts = captions.encode(list(batch["captions"]))
            for i, key in enumerate(batch["__key__"]):
                embeddings, mask, _ = texts[i]
                writer.write(
                    key,
                    mean=mean[i].to(store),
                    logvar=logvar[i].to(store),
                    embeddings=embeddings.to(store),
                    mask=mask,
                    caption=batch["captions"][i],
                )
            count += mean.shape[0]
        paths = list(writer.paths)
    if count == 0:
        raise ConfigError(f"data.train: {list(d.train)} yielded no samples to precache")
    seconds = time.perf_counter() - started
    stats = {
        "num_samples": count,
        "num_shards": len(paths),
        "shards": [p.name for p in paths],
        "resolution": d.resolution,
        "distinct_captions": len(captions.entries),
        "seconds": seconds,
        "samples_per_s": count / max(seconds, 1e-9),
    }
    (Path(out) / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats
