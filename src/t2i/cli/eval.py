"""`t2i eval shapes`: sample one image per captioned-shapes prompt and score it with the analytic judge."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Sequence
from pathlib import Path

# Our option -> keyword names a pipeline's `generate` may use for it, most likely first.
_GENERATE_KWARGS = {
    "steps": ("steps", "num_inference_steps"),
    "sampler": ("sampler",),
    "guidance": ("guidance_scale", "guidance", "cfg_scale"),
    "seed": ("seed",),
}


def register(subparsers) -> None:
    """Add the `eval` command and its actions."""
    parser = subparsers.add_parser("eval", help="evaluate a model (captioned-shapes accuracy)")
    actions = parser.add_subparsers(dest="eval_command", metavar="ACTION")
    shapes = actions.add_parser(
        "shapes",
        help="colour/shape/position accuracy on captioned-shapes prompts",
        description="Generate one image per prompt of a shapes split and score it with the analytic judge.",
    )
    shapes.add_argument("--model", required=True, help="pipeline folder (or cascade folder)")
    shapes.add_argument(
        "--num", type=int, default=None, help="number of prompts (default: the whole split, cycled)"
    )
    shapes.add_argument("--split", choices=("heldout", "train"), default="heldout", help="prompt split")
    shapes.add_argument("--out", default=None, help="write a captioned PNG grid here")
    shapes.add_argument("--steps", type=int, default=None, help="sampling steps (pipeline default if unset)")
    shapes.add_argument("--sampler", default=None, help="sampler name (pipeline default if unset)")
    shapes.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    shapes.add_argument("--seed", type=int, default=0, help="seed of the first batch (batch i uses seed + i)")
    shapes.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    parser.set_defaults(func=run, _parser=parser)


def split_prompts(split: str, num: int | None) -> list[str]:
    """Prompts of `split` (heldout | train), cycled or cut to `num`."""
    from t2i.data.shapes import heldout_prompts, training_prompts

    prompts = heldout_prompts() if split == "heldout" else training_prompts()
    num = len(prompts) if num is None else num
    return [prompts[i % len(prompts)] for i in range(num)]


def _generate_kwargs(pipe, options: dict) -> dict:
    """Map our options onto the keyword names `pipe.generate` accepts (unset options are left out)."""
    params = inspect.signature(pipe.generate).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {}
    for option, value in options.items():
        if value is None:
            continue
        names = [n for n in _GENERATE_KWARGS[option] if n in params] or (
            [_GENERATE_KWARGS[option][0]] if takes_any else []
        )
        if names:
            kwargs[names[0]] = value
    return kwargs


def _as_images(result) -> list:
    return list(result.images if hasattr(result, "images") else result)


def evaluate_shapes(
    pipe,
    prompts: Sequence[str],
    *,
    steps: int | None = None,
    sampler: str | None = None,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
) -> tuple[dict[str, float], list]:
    """Generate one image per prompt with ``pipe.generate`` and score them with `t2i.data.judge.score`.

    Returns ``(scores, images)``; scores has per-attribute accuracy ``colour``, ``shape``, ``position``,
    ``all`` and the count ``n``.
    """
    from t2i.data.judge import score
    from t2i.errors import InvalidInputError

    if not prompts or batch_size < 1:
        raise InvalidInputError(
            f"eval shapes: need prompts and batch_size >= 1, got {len(prompts)}/{batch_size}"
        )
    images: list = []
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        options = {"steps": steps, "sampler": sampler, "guidance": guidance, "seed": seed + i}
        batch = list(prompts[start : start + batch_size])
        images += _as_images(pipe.generate(batch, **_generate_kwargs(pipe, options)))
    return score(images, prompts), images


def load_model(path: str):
    """A pipeline (`t2i.load_pipeline`) or, for a cascade folder, a cascade (`t2i.load_cascade`)."""
    import t2i
    from t2i.errors import PipelineLoadError

    if not hasattr(t2i, "load_pipeline"):
        raise PipelineLoadError(f"{path}: t2i.load_pipeline is not available in this build")
    folder = Path(path)
    if any((folder / name).is_file() for name in ("cascade.json", "cascade.yaml")):
        return t2i.load_cascade(path)
    try:
        return t2i.load_pipeline(path)
    except PipelineLoadError:
        if not hasattr(t2i, "load_cascade"):
            raise
        return t2i.load_cascade(path)


def run(args: argparse.Namespace) -> int:
    """`t2i eval shapes`: print accuracies and optionally write a captioned grid."""
    if getattr(args, "eval_command", None) != "shapes":
        args._parser.print_help()
        return 2
    from t2i.data.grid import make_grid
    from t2i.atomic import image_format, save_image

    if args.out:
        image_format(args.out, "--out ")  # before sampling, not after
    prompts = split_prompts(args.split, args.num)
    pipe = load_model(args.model)
    scores, images = evaluate_shapes(
        pipe, prompts, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
        seed=args.seed, batch_size=args.batch_size,
    )  # fmt: skip
    print(f"shapes eval ({args.split}, {int(scores['n'])} prompts)")
    for name in ("colour", "shape", "position", "all"):
        print(f"  {name:<9}{scores[name]:.3f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_image(make_grid(images, captions=prompts, ncols=min(8, len(images))), args.out)
        print(f"  grid: {args.out}")
    return 0
