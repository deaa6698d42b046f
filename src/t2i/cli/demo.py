"""`t2i demo [--family sd|flow|imagen] [--out DIR] [--quick]`: train a tiny text-to-image model on CPU, end to end,
and score it on held-out prompts. The demos themselves are `t2i.recipes.sd_demo` (sd and flow) and
`t2i.recipes.imagen_demo`;
`--quick` shrinks every phase to a smoke test (seconds; the accuracy is then meaningless).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from t2i.cli.common import add_command


def register(subparsers) -> None:
    """Add the `demo` command."""
    parser = add_command(
        subparsers, "demo", run,
        help="train a tiny text-to-image model on CPU and score it",
        description="Generate the captioned-shapes dataset, train a small VAE, precache latents and MiniLM "
        "embeddings, train a latent UNet on CPU, then sample held-out (colour, shape, position) prompts and "
        "score them with the analytic judge.",
    )
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument(
        "--family",
        choices=("flow", "sd", "imagen"),
        default="flow",
        help="flow: VAE + a Flux-shaped flow-matching transformer (default); sd: the same VAE + a latent UNet; "
        "imagen: a 16 px base + 32 px super-resolution cascade",
    )
    parser.add_argument("--task", choices=("single", "two-objects"), default="single",
                        help="single: one shape per image (default); two-objects: two shapes, scored on attribute "
                        "binding and their relation (sd and flow families)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test version (seconds)")
    parser.add_argument("--unet-steps", type=int, default=None, help="override the UNet (flow: transformer) training steps")
    parser.add_argument("--vae-steps", type=int, default=None, help="override the VAE training steps")
    parser.add_argument("--seed", type=int, default=None,
                        help="training seed of the VAE and the denoiser (default 0; sd and flow families)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for every phase (default: one per idle core, measured before each)")


def run(args: argparse.Namespace) -> int:
    from t2i.recipes.demo_common import format_summary

    if args.family == "imagen":
        if args.task != "single":
            from t2i.errors import InvalidInputError

            raise InvalidInputError("--task two-objects: runs with --family sd or flow; the Imagen demo is single")
        from t2i.recipes.imagen_demo import ImagenDemoSettings, run_imagen_demo

        out = args.out if args.out != "runs/demo" else "runs/demo-imagen"
        settings = ImagenDemoSettings.quick() if args.quick else ImagenDemoSettings()
        settings.threads = args.threads
        results = run_imagen_demo(out, settings=settings)
        print(format_summary(results, f"grid: {results['grid']}   cascade: {results['cascade']}"))
        return 0
    from t2i.recipes.sd_demo import DemoSettings, run_demo

    if args.family == "flow":
        settings = DemoSettings.flow(quick=args.quick)
    else:
        settings = DemoSettings.quick() if args.quick else DemoSettings()
        args.out = args.out if args.out != "runs/demo" else "runs/demo-sd"
    if args.task == "two-objects":
        settings.for_two_objects()
        args.out = args.out if args.out != "runs/demo" else f"runs/demo-two-objects{'-sd' * (not settings.is_flow)}"
    for name in ("unet_steps", "vae_steps", "threads", "seed"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    results = run_demo(Path(args.out), settings)
    print(format_summary(results, f"grid: {results['grid']}   pipeline: {results['pipeline']}"))
    return 0
