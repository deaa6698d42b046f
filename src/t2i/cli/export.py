"""`t2i export RUN --out DIR`: turn a training run (or one checkpoint) into an inference folder.

For `latent_diffusion` runs the folder is a t2i pipeline (diffusers layout + t2i.yaml) that `t2i.load_pipeline`
and `diffusers.StableDiffusionPipeline.from_pretrained` both load; for `autoencoder` runs it is a diffusers VAE
folder. The EMA weights are exported unless `--no-ema` is given (or the run kept no EMA).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers) -> None:
    """Add the `export` command."""
    parser = subparsers.add_parser(
        "export",
        help="export a training run as a pipeline folder",
        description="Export a run directory (its newest checkpoint) or a ckpt-N directory to an inference "
        "folder: a Stable Diffusion pipeline (loads in t2i and diffusers) or a VAE folder.",
    )
    parser.add_argument("run", help="run directory (trainer.out_dir) or checkpoint directory (ckpt-N)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--no-ema", action="store_true", help="export the live weights instead of the EMA")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides (e.g. model.first_stage_config.from_pretrained=VAE_DIR)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = export_run(args.run, args.out, use_ema=not args.no_ema, overrides=list(args.overrides))
    print(f"exported {args.run} -> {path}")
    return 0


def resolve_run(run: str | Path) -> tuple[Path, Path]:
    """(checkpoint dir, config.yaml) for a run dir (its newest checkpoint that verifies; skipped ones are
    logged) or a checkpoint dir (CheckpointError if it does not verify); PipelineLoadError when neither."""
    from t2i.errors import CheckpointError, PipelineLoadError
    from t2i.train.checkpoint import (
        MARKER_FILE,
        list_checkpoints,
        newest_verified_checkpoint,
        verify_checkpoint,
    )

    path = Path(run)
    if (path / "state.pt").is_file() or (path / MARKER_FILE).is_file():
        ckpt = path
        problem = verify_checkpoint(ckpt)
        if problem:
            raise CheckpointError(f"{ckpt}: {problem}")
    else:
        ckpt = newest_verified_checkpoint(path)
        if ckpt is None:
            found = "none of its checkpoints verifies" if list_checkpoints(path) else "no checkpoint found"
            raise PipelineLoadError(f"{run}: {found}; expected a run directory with complete ckpt-* folders "
                                    "or a ckpt-N directory")
    for config in (ckpt / "config.yaml", ckpt.parent / "config.yaml"):
        if config.is_file():
            return ckpt, config
    raise PipelineLoadError(f"{ckpt}: no config.yaml beside the checkpoint; expected the run's resolved config")


def export_run(run: str | Path, out: str | Path, use_ema: bool = True, overrides: list[str] | None = None) -> Any:
    """Build the run's task from its config, load the checkpoint's (EMA) weights and export to `out`."""
    from t2i.config import load_config
    from t2i.train.checkpoint import load_weights
    from t2i.train.task import build_task

    ckpt, config = resolve_run(run)
    cfg = load_config(config, overrides or [])
    task = build_task(cfg)
    task.load_model_state_dict(load_weights(ckpt, use_ema))
    task.eval()
    return task.export(out, use_ema=False)
