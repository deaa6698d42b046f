"""`t2i precache CONFIG data=SHARDS out=DIR [key=value ...]`: run the frozen first stage and text encoder once.

The shards it writes, and how a run reads them: `t2i.train.precache` (latent diffusion and Imagen configs).
"""

from __future__ import annotations

import argparse

from t2i.cli.common import add_command, add_config_arguments

SPECIAL_KEYS = ("data", "out")


def register(subparsers) -> None:
    """Add the `precache` command."""
    parser = add_command(
        subparsers, "precache", run, help="encode a dataset once with the frozen first stage and text encoder",
        description="Encode images with the config's first stage (the VAE of first_stage_config.from_pretrained, or "
        "pixels for Imagen) and captions with its text encoder, writing precached shards. `data=` (default: the "
        "config's data.train) and `out=` are required-style arguments; other key=value pairs override the config.",
    )  # fmt: skip
    add_config_arguments(parser, "data=SHARDS out=DIR and config overrides")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder batch (default 64)")
    parser.add_argument("--shard-size", type=int, default=2000, help="samples per output shard (default 2000)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="storage dtype of the text embeddings (default float32)")


def split_arguments(items: list[str]) -> tuple[dict[str, str], list[str]]:
    """Separate `data=` / `out=` from dotted config overrides."""
    special: dict[str, str] = {}
    overrides: list[str] = []
    for item in items:
        key, sep, value = item.partition("=")
        if sep and key in SPECIAL_KEYS:
            special[key] = value
        else:
            overrides.append(item)
    return special, overrides


def run(args: argparse.Namespace) -> int:
    from t2i.config import load_config
    from t2i.errors import ConfigError

    special, overrides = split_arguments(list(args.overrides))
    if "data" in special:
        overrides.append(f"data.train={special['data']}")
    if "out" not in special:
        raise ConfigError("out: missing; expected out=DIR for the precached shards")
    cfg = load_config(args.config, overrides)
    from t2i.train.precache import precache, precache_imagen

    fn = precache_imagen if cfg.model.kind == "imagen" else precache
    stats = fn(cfg, special["out"], args.batch_size, args.shard_size, args.dtype)
    scale = f"; suggested model.scale_factor={stats['scale_factor']:.5f}" if "scale_factor" in stats else ""
    print(f"precached {stats['num_samples']} samples into {stats['num_shards']} shard(s) in {special['out']} "
          f"({stats['samples_per_s']:.1f} samples/s){scale}")
    return 0
