"""`t2i train CONFIG [key=value ...]`: train any model family from a YAML config (works under torchrun)."""

from __future__ import annotations

import argparse

from t2i.cli.common import add_command, add_config_arguments


def register(subparsers) -> None:
    """Add the `train` command."""
    parser = add_command(
        subparsers, "train", run, help="train or fine-tune a model from a config",
        description="Train from a YAML config (a path, or a bundled name such as sd15 or demo/shapes) with "
        "dotted overrides, e.g. `t2i train sd15 trainer.precision=bf16 data.train=[a.tar,b.tar]`. "
        "Multi-GPU: `torchrun --nproc_per_node N -m t2i.cli.main train CONFIG ...`.",
    )  # fmt: skip
    add_config_arguments(parser)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    """Load the config with overrides, then print it or train."""
    from t2i.config import load_config, to_yaml

    cfg = load_config(args.config, list(args.overrides))
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from t2i.train.trainer import train

    result = train(cfg)
    if result.last_checkpoint is not None:
        print(f"trained to step {result.step}; last checkpoint: {result.last_checkpoint}")
    return 0
