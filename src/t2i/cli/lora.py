"""`t2i lora`: train a LoRA on any pipeline, or run the shapes personalisation measurement.

    t2i lora train --config configs/demo/shapes-lora.yaml --set model.unet_config.from_pretrained=runs/demo-sd/pipeline
    t2i lora train --config my.yaml --class-prompt "a circle" --class-images 8 --prior-loss-weight 1.0 \
        --prior-loss distill
    t2i lora train --config my.yaml --type loha      # or --type lokr, or --dora (weight-decomposed LoRA)
    t2i lora personalize --base runs/demo-sd/pipeline --out runs/lora-new-colour

`train` writes the run (checkpoints, logs) to trainer.out_dir and the LoRA to OUT_DIR/lora.safetensors (LoRA and
DoRA in diffusers' naming, LoHa and LoKr in LyCORIS' kohya naming); use it with
`t2i sample --lora OUT_DIR/lora.safetensors:0.8`. `python -m t2i.cli.lora ...` is the same command.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from t2i.cli.common import add_command
from t2i.config import PRIOR_LOSSES
from t2i.config.common import LORA_TYPES


def register(subparsers: Any) -> None:
    parser = add_command(subparsers, "lora", _help, help="train LoRA adapters / measure personalisation",
                         description="LoRA fine-tuning on top of any pipeline t2i loads.")  # fmt: skip
    add_lora_commands(parser)


def _help(args: argparse.Namespace) -> int:
    """`t2i lora` alone: the actions are required, so argparse has already said which; nothing to run."""
    return 2


def add_lora_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lora_command", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train a LoRA from a config with model.lora set")
    train.add_argument("--config", required=True, help="config name or YAML path (model.lora must be set)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    train.add_argument("--class-prompt", action="append", default=[], help="prior-preservation class prompt")
    train.add_argument("--class-images", type=int, default=8, help="class images per class prompt")
    train.add_argument("--prior-loss-weight", type=float, default=1.0)
    train.add_argument(
        "--prior-loss", default=None, choices=PRIOR_LOSSES,
        help="diffusion (default): DreamBooth's loss on the class images; distill: match the frozen base's "
        "predictions; overrides model.lora.prior.loss",
    )
    train.add_argument("--train-text-encoder", action="store_true", help="LoRA on the text encoder too")
    train.add_argument(
        "--type", dest="lora_type", default=None, choices=LORA_TYPES,
        help="adapter kind: lora (B A), loha or lokr (LyCORIS); overrides model.lora.type",
    )
    train.add_argument("--dora", action="store_true", help="weight-decomposed LoRA (DoRA); sets model.lora.dora")
    train.add_argument("--out", help="where lora.safetensors goes (default: trainer.out_dir)")
    train.set_defaults(func=run_train)
    personal = sub.add_parser("personalize", help="teach the shapes demo model a new colour and score it")
    personal.add_argument("--base", required=True, help="trained shapes pipeline (folder or t2i run folder)")
    personal.add_argument("--out", required=True)
    personal.add_argument(
        "--colour", default="auto", choices=("auto", "teal", "brown", "cyan", "pink"),
        help="the new colour (default auto: the one the base's VAE decodes best)",
    )
    personal.add_argument("--steps", type=int, default=None, help="LoRA training steps")
    personal.add_argument("--images", type=int, default=None, help="training images (<= 50)")
    personal.add_argument("--scale", type=float, default=None, help="LoRA scale at evaluation (default 1.0)")
    personal.add_argument("--prior-loss", default=None, choices=PRIOR_LOSSES, help="default distill")
    personal.add_argument("--lr", type=float, default=None, help="LoRA learning rate (default 1.5e-3)")
    personal.add_argument("--seed", type=int, default=None, help="images, prior prompts, LoRA init (default 0)")
    personal.add_argument("--threads", type=int, default=1)
    personal.set_defaults(func=run_personalize)


def run_train(args: argparse.Namespace) -> int:
    from t2i.config import load_config
    from t2i.train.task import build_task
    from t2i.train.trainer import train

    cfg = with_cli_lora_options(load_config(args.config, args.overrides), args)
    # every family: the task wrapped in LoRA (t2i.train.tasks.adapters); lora_A initialisation seeded from cfg.seed
    task = build_task(cfg)
    train(cfg, task)
    task.eval()
    print(task.export(args.out or cfg.trainer.out_dir))
    return 0


def with_cli_lora_options(cfg: Any, args: argparse.Namespace) -> Any:
    """The config with the command line's prior-preservation, text-encoder and adapter-kind flags applied to
    `model.lora`."""
    from dataclasses import replace

    from t2i.config import LoraPriorConfig
    from t2i.errors import ConfigError

    lora = getattr(cfg.model, "lora", None)
    if lora is None:
        raise ConfigError(f"model.lora: missing in {args.config}; expected {{rank, alpha, dropout, target_modules}}")
    prior = lora.prior
    if args.class_prompt:
        prior = LoraPriorConfig(list(args.class_prompt), args.class_images, args.prior_loss_weight,
                                args.prior_loss or "diffusion")  # fmt: skip
        prior.check("model.lora.prior")  # the flags fill that section
    elif prior is not None and args.prior_loss is not None:
        prior = replace(prior, loss=args.prior_loss)
    lora = replace(lora, prior=prior, train_text_encoder=lora.train_text_encoder or args.train_text_encoder,
                   type=args.lora_type or lora.type, dora=lora.dora or args.dora)  # fmt: skip
    lora.check("model.lora")  # the flags may combine badly with the file (e.g. --dora with type loha)
    return replace(cfg, model=replace(cfg.model, lora=lora))


# `t2i lora personalize` flag (argparse dest) -> PersonalizeSettings field
PERSONALIZE_FLAGS = {"steps": "steps", "images": "num_images", "scale": "scale", "lr": "lr",
                     "prior_loss": "prior_loss", "seed": "seed"}  # fmt: skip


def run_personalize(args: argparse.Namespace) -> int:
    import torch

    from t2i.recipes.personalize import PersonalizeSettings, personalize

    torch.set_num_threads(args.threads)
    settings = PersonalizeSettings(colour=args.colour)
    for flag, name in PERSONALIZE_FLAGS.items():  # only the flags given replace the measured defaults
        if getattr(args, flag) is not None:
            setattr(settings, name, getattr(args, flag))
    results = personalize(args.base, args.out, settings)
    print(json.dumps({k: v for k, v in results.items() if k != "settings"}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    from t2i.errors import T2IError

    parser = argparse.ArgumentParser(prog="t2i lora", description="LoRA fine-tuning on top of any pipeline.")
    add_lora_commands(parser)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except T2IError as err:
        print(f"t2i lora: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
