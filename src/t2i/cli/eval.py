"""`t2i eval`: score a model (or a folder of images it generated).

Actions:
- ``shapes``: captioned-shapes accuracy with the analytic judge; ``--fid`` adds FID and KID in the judge's
  feature space against dataset renderings of the same prompts.
- ``metrics --fid --kid --clip-score`` (any combination): images are generated (or read with ``--images``)
  once, in batches, and every requested metric is computed in that one pass.
- ``fid``, ``kid``, ``clip-score``: the same command with one metric selected.
"""

from __future__ import annotations

import argparse
import inspect
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# Our option -> keyword names a pipeline's `generate` may use for it, most likely first.
_GENERATE_KWARGS = {
    "steps": ("steps", "num_inference_steps"),
    "sampler": ("sampler",),
    "guidance": ("guidance_scale", "guidance", "cfg_scale"),
    "seed": ("seed",),
    "progress": ("progress",),
}
_METRIC_ACTIONS = {"fid": "fid", "kid": "kid", "clip-score": "clip_score"}


def register(subparsers) -> None:
    """Add the `eval` command and its actions."""
    parser = subparsers.add_parser("eval", help="evaluate a model: shapes accuracy, FID, KID, CLIP score")
    actions = parser.add_subparsers(dest="eval_command", metavar="ACTION")
    _register_shapes(actions)
    metrics = actions.add_parser(
        "metrics",
        help="FID / KID / CLIP score in one pass over generated (or given) images",
        description="Generate images once (or read --images) and compute every metric asked for.",
    )
    for flag, what in (("--fid", "Fréchet Inception distance"), ("--kid", "kernel Inception distance")):
        metrics.add_argument(flag, action="store_true", help=f"{what} (needs --reference and --inception)")
    metrics.add_argument("--clip-score", action="store_true", help="CLIP score (needs --clip)")
    _add_metric_arguments(metrics)
    for action, key in _METRIC_ACTIONS.items():
        single = actions.add_parser(
            action, help=f"`metrics --{action}`", description=f"`t2i eval metrics --{action}`."
        )
        _add_metric_arguments(single)
        single.set_defaults(**{k: k == key for k in _METRIC_ACTIONS.values()})
    parser.set_defaults(func=run, _parser=parser)


def _add_sampling_arguments(parser: argparse.ArgumentParser, batch_size: int) -> None:
    group = parser.add_argument_group("sampling (with --model)")
    group.add_argument("--steps", type=int, default=None, help="sampling steps (pipeline default if unset)")
    group.add_argument("--sampler", default=None, help="sampler name (pipeline default if unset)")
    group.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    group.add_argument("--seed", type=int, default=0, help="seed of the first batch (batch i uses seed + i)")
    group.add_argument(
        "--batch-size", type=int, default=batch_size, help="images per generate call / feature batch"
    )
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _register_shapes(actions) -> None:
    shapes = actions.add_parser(
        "shapes",
        help="colour/shape/position accuracy on captioned-shapes prompts (+ judge-feature FID)",
        description="Generate one image per prompt of a shapes split and score it with the analytic judge.",
    )
    source = shapes.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="pipeline folder (or cascade folder)")
    source.add_argument(
        "--images", help="score these images instead (folder or shards; captions beside them)"
    )
    shapes.add_argument(
        "--num", type=int, default=None, help="number of prompts (default: the whole split, cycled)"
    )
    shapes.add_argument("--split", choices=("heldout", "train"), default="heldout", help="prompt split")
    shapes.add_argument("--out", default=None, help="write a captioned PNG grid here")
    shapes.add_argument("--fid", action="store_true", help="also FID and KID in the judge's feature space")
    shapes.add_argument(
        "--reference-per-prompt",
        type=int,
        default=4,
        help="dataset renderings per prompt for --fid (default 4)",
    )
    _add_sampling_arguments(shapes, batch_size=16)


def _add_metric_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="pipeline folder (or cascade folder) to sample from")
    source.add_argument("--images", help="evaluate these images instead: a folder or webdataset shards")
    parser.add_argument(
        "--prompts", help="text file, one prompt per line (default: the reference's captions)"
    )
    parser.add_argument(
        "--num", type=int, default=None, help="images to generate / read (default: one per prompt)"
    )
    group = parser.add_argument_group("FID / KID")
    group.add_argument(
        "--reference", help="reference images: a folder, a tar, a glob or a brace pattern of shards"
    )
    group.add_argument(
        "--reference-features", help="cache .npz of the reference features: read if it exists, else written"
    )
    group.add_argument(
        "--max-reference", type=int, default=None, help="use at most this many reference images"
    )
    group.add_argument("--inception", help="FID Inception weights, e.g. pt_inception-2015-12-05-6726825d.pth")
    group.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    group.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (default 1000)")
    parser.add_argument("--clip", help="CLIP score: a local Hugging Face CLIP folder (CLIPModel + tokenizer)")
    parser.add_argument("--save-images", help="also write the generated images (and .txt prompts) here")
    parser.add_argument("--json", help="also write the results to this JSON file")
    _add_sampling_arguments(parser, batch_size=25)


def split_prompts(split: str, num: int | None) -> list[str]:
    """Prompts of `split` (heldout | train), cycled or cut to `num`."""
    from t2i.data.shapes import heldout_prompts, training_prompts

    prompts = heldout_prompts() if split == "heldout" else training_prompts()
    return cycle_prompts(prompts, num)


def cycle_prompts(prompts: Sequence[str], num: int | None) -> list[str]:
    """`prompts` cycled or cut to `num` (all of them when None)."""
    from t2i.errors import InvalidInputError

    num = len(prompts) if num is None else num
    if num < 1 or not prompts:
        raise InvalidInputError(
            f"--num: expected >= 1 and at least one prompt, got {num} / {len(prompts)} prompts"
        )
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
            [_GENERATE_KWARGS[option][0]] if takes_any and option != "progress" else []
        )
        if names:
            kwargs[names[0]] = value
    return kwargs


def _as_images(result) -> list:
    return list(result.images if hasattr(result, "images") else result)


def generate_batches(
    pipe,
    prompts: Sequence[str],
    *,
    steps: int | None = None,
    sampler: str | None = None,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> Iterator[tuple[list, list[str]]]:
    """``(images, prompts)`` per `pipe.generate` call of `batch_size` prompts; batch i uses seed + i."""
    from tqdm.auto import tqdm

    from t2i.errors import InvalidInputError

    if not prompts or batch_size < 1:
        raise InvalidInputError(f"eval: need prompts and --batch-size >= 1, got {len(prompts)}/{batch_size}")
    with tqdm(total=len(prompts), desc="generating", unit="img", disable=not progress, leave=False) as bar:
        for i, start in enumerate(range(0, len(prompts), batch_size)):
            options = {
                "steps": steps,
                "sampler": sampler,
                "guidance": guidance,
                "seed": seed + i,
                "progress": False,
            }
            batch = list(prompts[start : start + batch_size])
            images = _as_images(pipe.generate(batch, **_generate_kwargs(pipe, options)))
            if len(images) != len(batch):
                raise InvalidInputError(
                    f"eval: generate returned {len(images)} images for {len(batch)} prompts"
                )
            bar.update(len(batch))
            yield images, batch


def evaluate_shapes(pipe, prompts: Sequence[str], **options: Any) -> tuple[dict[str, float], list]:
    """Generate one image per prompt with ``pipe.generate`` and score them with `t2i.data.judge.score`.

    `options` are `generate_batches`' (steps, sampler, guidance, seed, batch_size, progress). Returns
    ``(scores, images)``; scores has per-attribute accuracy ``colour``, ``shape``, ``position``, ``all`` and
    the count ``n``.
    """
    from t2i.data.judge import score

    images: list = []
    for batch, _ in generate_batches(pipe, prompts, **options):
        images += batch
    return score(images, prompts), images


def load_model(path: str, device: str | None = None):
    """A pipeline (`t2i.load_pipeline`) or, for a cascade folder, a cascade (`t2i.load_cascade`)."""
    import t2i
    from t2i.errors import PipelineLoadError

    folder = Path(path)
    if any((folder / name).is_file() for name in ("cascade.json", "cascade.yaml")):
        return t2i.load_cascade(path, device=device)
    try:
        return t2i.load_pipeline(path, device=device)
    except PipelineLoadError:
        return t2i.load_cascade(path, device=device)


def _device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _check_positive(**values: int | None) -> None:
    from t2i.errors import InvalidInputError

    for name, value in values.items():
        if value is not None and value < 1:
            raise InvalidInputError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value}")


def _read_given_images(source: str, num: int | None) -> tuple[list, list[str | None]]:
    from t2i.metrics.images import iter_images

    items = list(iter_images(source, limit=num))
    if not items:
        from t2i.errors import DataError

        raise DataError(f"--images {source}: no readable images")
    return [item.image for item in items], [item.caption for item in items]


def run_shapes(args: argparse.Namespace) -> int:
    """`t2i eval shapes`: print accuracies (and judge FID/KID), optionally write a captioned grid."""
    from t2i.atomic import image_format, save_image
    from t2i.data.grid import make_grid
    from t2i.data.judge import score

    _check_positive(num=args.num, batch_size=args.batch_size, reference_per_prompt=args.reference_per_prompt)
    if args.out:
        image_format(args.out, "--out ")  # before sampling, not after
    if args.images:
        images, prompts = _read_given_images(args.images, args.num)
        prompts = [p or "" for p in prompts]
        scores, label = score(images, prompts), args.images
    else:
        prompts = split_prompts(args.split, args.num)
        pipe = load_model(args.model, _device(args))
        scores, images = evaluate_shapes(
            pipe, prompts, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
            seed=args.seed, batch_size=args.batch_size, progress=True,
        )  # fmt: skip
        label = args.split
    print(f"shapes eval ({label}, {int(scores['n'])} prompts)")
    for name in ("colour", "shape", "position", "all"):
        print(f"  {name:<9}{scores[name]:.3f}")
    if args.fid:
        _print_judge_distances(images, prompts, args.reference_per_prompt, args.seed)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_image(make_grid(images, captions=prompts, ncols=min(8, len(images))), args.out)
        print(f"  grid: {args.out}")
    return 0


def _print_judge_distances(images: list, prompts: list[str], per_prompt: int, seed: int) -> None:
    from t2i.metrics.judge_features import JudgeFeatures
    from t2i.metrics.stats import frechet_distance, kernel_inception_distance
    from t2i.metrics.training import judge_reference

    reference = judge_reference(sorted(set(prompts)), images[0].height, per_prompt, seed)
    fake = JudgeFeatures()(images)
    size = min(1000, len(reference), len(fake))
    kid, kid_std = kernel_inception_distance(reference.features, fake, 100, size, seed)
    print(
        f"  judge FID {frechet_distance(reference.features, fake):.4f}  (vs {len(reference)} dataset renderings)"
    )
    print(f"  judge KID {kid:.5f} +- {kid_std:.5f}  (subsets of {size})")


def _metric_setup(args: argparse.Namespace):
    """Check the options and load what the requested metrics need: (extractor | None, clip scorer | None)."""
    from t2i.errors import InvalidInputError

    if not (args.fid or args.kid or args.clip_score):
        raise InvalidInputError("eval metrics: choose at least one of --fid, --kid, --clip-score")
    _check_positive(num=args.num, batch_size=args.batch_size, max_reference=args.max_reference,
                    kid_subsets=args.kid_subsets)  # fmt: skip
    extractor = scorer = None
    if args.fid or args.kid:
        if not args.inception:
            raise InvalidInputError(
                "--inception: required for FID/KID; expected pt_inception-2015-12-05-6726825d.pth"
            )
        if not args.reference and not (args.reference_features and Path(args.reference_features).is_file()):
            raise InvalidInputError(
                "--reference: required for FID/KID (or an existing --reference-features file)"
            )
        from t2i.metrics.features import ModuleFeatures
        from t2i.metrics.inception import load_fid_inception

        extractor = ModuleFeatures(load_fid_inception(args.inception), "inception-v3-fid-2048", _device(args))
    if args.clip_score:
        if not args.clip:
            raise InvalidInputError(
                "--clip: required for the CLIP score; expected a local Hugging Face CLIP folder"
            )
        from t2i.metrics.clip_score import ClipScorer

        scorer = ClipScorer.load(args.clip, _device(args))
    return extractor, scorer


def _given_image_batches(
    source: str, num: int | None, batch_size: int, prompts: list[str] | None
) -> Iterator[tuple[list, list]]:
    """Batches of (images, captions) read from `source`; `prompts` (in order) replace the captions."""
    from tqdm.auto import tqdm

    from t2i.metrics.evaluate import batched
    from t2i.metrics.images import count_images, iter_images

    known = count_images(source)
    total = min(known, num) if known is not None and num is not None else known
    start = 0
    with tqdm(total=total, desc="images", unit="img", leave=False) as bar:
        for batch in batched(iter_images(source, limit=num), batch_size):
            captions = [item.caption for item in batch]
            if prompts is not None:
                captions = [prompts[(start + i) % len(prompts)] for i in range(len(batch))]
            start += len(batch)
            yield [item.image for item in batch], captions
            bar.update(len(batch))


def _image_batches(args: argparse.Namespace, reference_captions: list | None) -> Iterator[tuple[list, list]]:
    """Batches of (images, prompts) from --images or generated with --model."""
    from t2i.errors import InvalidInputError
    from t2i.metrics.images import read_prompts

    given = read_prompts(args.prompts) if args.prompts else None
    if args.images:
        yield from _given_image_batches(args.images, args.num, args.batch_size, given)
        return
    prompts = given or [c for c in (reference_captions or []) if c]
    if not prompts:
        raise InvalidInputError("--prompts: required (the reference has no captions to generate from)")
    pipe = load_model(args.model, _device(args))
    yield from generate_batches(
        pipe, cycle_prompts(prompts, args.num), steps=args.steps, sampler=args.sampler, guidance=args.guidance,
        seed=args.seed, batch_size=args.batch_size, progress=True,
    )  # fmt: skip


def _save_batch(folder: Path, start: int, images: list, prompts: list) -> None:
    from t2i.metrics.files import atomic_save_png, atomic_write_text

    for i, (image, prompt) in enumerate(zip(images, prompts), start=start):
        atomic_save_png(folder / f"{i:06d}.png", image)
        if prompt is not None:
            atomic_write_text(folder / f"{i:06d}.txt", prompt + "\n")


def run_metrics(args: argparse.Namespace) -> int:
    """`t2i eval metrics|fid|kid|clip-score`: one pass over the images; print (and optionally save) results."""
    from t2i.metrics.evaluate import StreamingScores, reference_features

    extractor, scorer = _metric_setup(args)
    reference = None
    if extractor is not None:
        reference = reference_features(
            extractor, args.reference, args.reference_features, args.max_reference, args.batch_size
        )
    captions = reference.captions if reference is not None else None
    scores = StreamingScores(extractor, scorer)
    for images, prompts in _image_batches(args, captions):
        if args.save_images:
            _save_batch(Path(args.save_images), scores.count, images, prompts)
        scores.add(images, prompts)
    results = scores.results(reference.features if reference else None, args.fid, args.kid, args.kid_subsets,
                             args.kid_subset_size, args.seed)  # fmt: skip
    _print_results(results, reference)
    if args.json:
        from t2i.metrics.files import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0


def _print_results(results: dict[str, float], reference) -> None:
    line = f"metrics over {int(results['n'])} images"
    if reference is not None:
        line += f" (reference: {len(reference.features)} images"
        skipped = reference.stats.total
        line += f", {skipped} unreadable skipped)" if skipped else ")"
    print(line)
    if "fid" in results:
        print(f"  FID        {results['fid']:.4f}")
    if "kid_mean" in results:
        print(f"  KID        {results['kid_mean']:.6f} +- {results['kid_std']:.6f}  "
              f"(subsets of {int(results['kid_subset_size'])})")  # fmt: skip
    if "clip_score" in results:
        print(f"  CLIP score {results['clip_score']:.4f}")


def run(args: argparse.Namespace) -> int:
    command = getattr(args, "eval_command", None)
    if command == "shapes":
        return run_shapes(args)
    if command in ("metrics", *_METRIC_ACTIONS):
        return run_metrics(args)
    args._parser.print_help()
    return 2
