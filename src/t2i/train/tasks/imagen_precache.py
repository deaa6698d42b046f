"""Precache an Imagen dataset: pixels (identity first stage) and per-token text embeddings, encoded once.

Writes the `t2i.data.precached` shard format, so `ImagenTask` reads it with
`model.conditioning.precached_key=embeddings model.conditioning.online_encoding=false data.train=DIR`:
`image_encoded.mean` holds the images in [-1, 1] at `data.resolution` (one precache at the largest stage's size
serves every stage: each shrinks the pixels to its own size), `captions_encoded` the embeddings and mask of
the stage's text encoder with `max_length = conditioning.token_length`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from t2i.errors import ConfigError


def precache_imagen(
    cfg: Any, out: str | Path, batch_size: int = 64, shard_size: int = 2000, dtype: str = "float16"
) -> dict[str, Any]:
    """Encode `cfg.data.train` into precached shards under `out`; returns the statistics written to stats.json.

    `dtype` is the storage type of pixels and embeddings (float16 halves the shards; pixels keep 8-bit accuracy).
    """
    import torch
    from torch.utils.data import DataLoader

    from t2i.cli.precache import CaptionCache
    from t2i.data.precached import PrecachedShardWriter
    from t2i.data.readers import build_dataset
    from t2i.models.first_stage import IdentityFirstStage
    from t2i.pipelines.imagen_stage import parse_stage_settings
    from t2i.text.encoders import build_text_encoder

    if cfg.model.kind != "imagen":
        raise ConfigError(f"model.kind: {cfg.model.kind!r}; precache_imagen needs imagen")
    c = parse_stage_settings(cfg.model).conditioning
    encoder = build_text_encoder(c.encoder_kind, c.encoder_path, max_length=c.token_length)
    captions, first_stage = CaptionCache(encoder), IdentityFirstStage()
    d = cfg.data
    dataset = build_dataset(d.train, d.resolution, d.center_crop, False, shuffle=False, rank=0, world_size=1)
    store = getattr(torch, dtype)
    count, started = 0, time.perf_counter()
    with PrecachedShardWriter(out, shard_size) as writer, torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size, num_workers=d.num_workers):
            mean, logvar = first_stage.encode_moments(batch["images"])
            texts = captions.encode(list(batch["captions"]))
            for i, key in enumerate(batch["__key__"]):
                embeddings, mask = texts[i]
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
