"""`t2i sample`: generate images from a pipeline folder or a single-file checkpoint.

    t2i sample --model runs/x/export --prompt "a red circle" --out out.png --steps 30 --seed 0
    t2i sample --model sd15.safetensors --config sd15 --set model.cond_stage_config.path=tok/ --prompt ... --out o.png
    t2i sample --model DIR --prompt "..." --init-image in.png --strength 0.6 --out out.png

Arguments are added group by group (`add_*_arguments`) so later options (e.g. LoRA) extend one group, and
`prepare_pipeline` is where options that modify a loaded pipeline are applied.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DTYPES = ("float32", "float16", "bfloat16")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate images from a pipeline or checkpoint",
        description="Generate images with a Stable Diffusion pipeline (diffusers/t2i folder or single file).",
    )
    add_model_arguments(parser)
    add_prompt_arguments(parser)
    add_sampling_arguments(parser)
    add_image_to_image_arguments(parser)
    add_micro_conditioning_arguments(parser)
    parser.set_defaults(func=run)


def add_model_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", required=True, help="pipeline folder (diffusers or t2i) or single-file checkpoint"
    )
    group.add_argument("--config", help="architecture of a single file: sd15, sd2, sd21-v or a YAML path")
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a --config key, e.g. model.cond_stage_config.path=DIR (repeatable)",
    )
    group.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    group.add_argument("--dtype", choices=DTYPES, default="float32", help="UNet/VAE weight dtype")
    group.add_argument("--variant", help="a folder's weight files of this variant, e.g. fp16 (*.fp16.safetensors)")
    group.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="LoRA .safetensors (diffusers/PEFT or kohya-ss naming), scale 1 by default (repeatable)",
    )
    return group


def add_prompt_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("prompt and output")
    group.add_argument(
        "--prompt", required=True, action="append", help="text prompt; repeat for a batch of prompts"
    )
    group.add_argument("--negative-prompt", help="what to steer away from (default: the empty prompt)")
    group.add_argument("--num-images", type=int, default=1, help="images per prompt")
    group.add_argument(
        "--out", required=True, help="output PNG; several images get -0, -1, ... before the suffix"
    )
    return group


def add_sampling_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("sampling")
    group.add_argument("--steps", type=int, default=None, help="sampling steps (default 30; a cascade: each stage's own)")
    group.add_argument(
        "--sampler", help="ddim, plms, euler, dpmpp_2m, ... (default: the pipeline's scheduler)"
    )
    group.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale, <= 1: off (default: SD 7.5, SDXL 5.0; a cascade: each stage's own; Flux: the model's own)",
    )
    group.add_argument(
        "--guidance-rescale", type=float, default=None,
        help="diffusers' guidance_rescale in [0, 1] for zero-terminal-SNR models (SD family; default 0 = off)",
    )  # fmt: skip
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--height", type=int, default=None)
    group.add_argument("--width", type=int, default=None)
    group.add_argument("--karras", action="store_true", help="Karras et al. (rho 7) sigmas")
    group.add_argument(
        "--eta", type=float, default=None,
        help="noise of the stochastic samplers (default: theirs; ddim: 0, euler_ancestral / dpmpp_2m_sde: 1)",
    )  # fmt: skip
    return group


def add_image_to_image_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("image to image")
    group.add_argument("--init-image", help="start from this image (img2img; the source of --mask and --edit)")
    group.add_argument(
        "--strength", type=float, default=None,
        help="how much of the schedule to run, in (0, 1] (default 0.6; with --mask 1.0)",
    )  # fmt: skip
    group.add_argument("--mask", help="inpaint where this mask is white (needs a 9-channel inpainting UNet)")
    group.add_argument(
        "--edit", action="store_true", help="the prompt is an instruction for --init-image (InstructPix2Pix UNet)"
    )
    group.add_argument(
        "--image-guidance", type=float, default=None, help="--edit: pull towards the source image (default 1.5)"
    )
    return group


# --flag -> diffusers' keyword; pairs are (height, width) or (top, left)
MICRO_PAIRS = {
    "original_size": "original_size", "target_size": "target_size", "crops": "crops_coords_top_left",
    "negative_original_size": "negative_original_size", "negative_target_size": "negative_target_size",
    "negative_crops": "negative_crops_coords_top_left",
}  # fmt: skip
MICRO_SCORES = {"aesthetic_score": "aesthetic_score", "negative_aesthetic_score": "negative_aesthetic_score"}


def add_micro_conditioning_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group(
        "SDXL micro-conditioning", "diffusers' defaults: sizes = the image's, crops 0 0, aesthetic score 6 / 2.5"
    )
    for flag in MICRO_PAIRS:
        metavar = ("TOP", "LEFT") if "crops" in flag else ("H", "W")
        group.add_argument("--" + flag.replace("_", "-"), type=int, nargs=2, metavar=metavar, default=None)
    group.add_argument("--aesthetic-score", type=float, default=None, help="the refiner's (default 6.0)")
    group.add_argument("--negative-aesthetic-score", type=float, default=None, help="the refiner's (default 2.5)")
    return group


def micro_conditioning_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The given micro-conditioning flags as diffusers' keywords (the pipeline rejects those its model ignores)."""
    out: dict[str, Any] = {}
    for flag, keyword in MICRO_PAIRS.items():
        if getattr(args, flag, None) is not None:
            out[keyword] = tuple(getattr(args, flag))
    for flag, keyword in MICRO_SCORES.items():
        if getattr(args, flag, None) is not None:
            out[keyword] = getattr(args, flag)
    return out


def micro_conditioning_of_pipeline(pipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    micro = micro_conditioning_from_args(args)
    from t2i.pipelines.latent import LatentPipeline

    if micro and not isinstance(pipe, LatentPipeline):
        from t2i.errors import InvalidInputError

        flag = "--" + next(f for f in {**MICRO_PAIRS, **MICRO_SCORES} if getattr(args, f, None) is not None)
        raise InvalidInputError(f"{flag.replace('_', '-')}: micro-conditioning is for SDXL pipelines, not {type(pipe).__name__}")
    return micro


def load_from_args(args: argparse.Namespace) -> Any:
    """The pipeline named by --model/--config/--set, on --device in --dtype."""
    import torch

    from t2i.pipelines.loading import load_pipeline

    quiet_library_loaders()
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    pipe = load_pipeline(args.model, config=args.config, device=device, dtype=dtype,
                         overrides=args.overrides or None, variant=getattr(args, "variant", None))  # fmt: skip
    return prepare_pipeline(pipe, args).to(device)


def resolve_device(name: str | None) -> str:
    """The --device to use (default: cuda when available); InvalidInputError for one this machine lacks."""
    import torch

    from t2i.errors import InvalidInputError

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InvalidInputError(f"--device {name}: unknown device; expected cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise InvalidInputError(f"--device {name}: CUDA is not available ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidInputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise InvalidInputError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise InvalidInputError(f"--device {name}: t2i samples on cpu, cuda or mps")
    return str(device)


def check_output(out: str) -> None:
    """--out must name an image file PIL can write (checked before any sampling)."""
    from t2i.atomic import image_format
    from t2i.errors import InvalidInputError

    path = Path(out)
    if path.is_dir() or out.endswith(("/", "\\")):
        raise InvalidInputError(f"--out {out}: is a directory; expected an image file such as {path / 'out.png'}")
    image_format(path, "--out ")


def check_lora_specs(specs: list[str]) -> None:
    """Each --lora PATH[:SCALE]: a SCALE that is not a number is named as such (not as a missing file)."""
    from t2i.errors import InvalidInputError

    for spec in specs:
        path, sep, scale = spec.rpartition(":")
        if not sep or not path or Path(spec).exists() or "/" in scale or "\\" in scale:
            continue
        try:
            float(scale)
        except ValueError:
            raise InvalidInputError(f"--lora {spec}: scale {scale!r} is not a number; expected PATH or PATH:SCALE "
                                    "such as style.safetensors:0.8") from None


def quiet_library_loaders() -> None:
    """Keep stderr for our progress bar and errors: no weight-loading bars or advice from transformers/diffusers."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def prepare_pipeline(pipe: Any, args: argparse.Namespace) -> Any:
    """Apply the options that modify a loaded pipeline (adapters such as --lora hook in here)."""
    if getattr(args, "lora", None):
        from t2i.lora.inference import load_loras_from_specs

        load_loras_from_specs(pipe, args.lora)
    return pipe


def generate_from_args(pipe: Any, args: argparse.Namespace) -> Any:
    common = {
        "negative_prompt": args.negative_prompt,
        "height": args.height,
        "width": args.width,
        "steps": 30 if args.steps is None else args.steps,
        "guidance_scale": getattr(pipe, "default_guidance", 7.5) if args.guidance is None else args.guidance,
        "sampler": args.sampler,
        "seed": args.seed,
        "use_karras_sigmas": args.karras,
        "eta": args.eta,
        "progress": True,
        **micro_conditioning_of_pipeline(pipe, args),
        **({"guidance_rescale": args.guidance_rescale} if args.guidance_rescale is not None else {}),
    }
    check_image_options(args)
    check_pipeline_takes(pipe, args)
    if args.mask:
        return pipe.inpaint(args.prompt, open_image(args.init_image), open_image(args.mask, "--mask", "L"),
                            strength=1.0 if args.strength is None else args.strength, num_images=args.num_images,
                            **common)  # fmt: skip
    if args.edit:
        image_guidance = 1.5 if args.image_guidance is None else args.image_guidance
        common = {k: v for k, v in common.items() if k not in ("height", "width")}
        return pipe.edit(args.prompt, open_image(args.init_image), image_guidance_scale=image_guidance,
                         num_images=args.num_images, **common)  # fmt: skip
    if args.init_image:
        if args.num_images < 1:
            from t2i.errors import InvalidInputError

            raise InvalidInputError(f"--num-images: expected an integer >= 1, got {args.num_images}")
        prompts = [p for p in args.prompt for _ in range(args.num_images)]
        strength = 0.6 if args.strength is None else args.strength
        return pipe.reconstruct(prompts, open_image(args.init_image), strength=strength, **common)
    return pipe.generate(args.prompt, num_images=args.num_images, **common)


def check_image_options(args: argparse.Namespace) -> None:
    """--mask and --edit need --init-image and exclude each other; --image-guidance belongs to --edit."""
    from t2i.errors import InvalidInputError

    for flag, given in (("--mask", args.mask), ("--edit", args.edit)):
        if given and not args.init_image:
            raise InvalidInputError(f"{flag}: needs --init-image (the image to {'inpaint' if flag == '--mask' else 'edit'})")
    if args.mask and args.edit:
        raise InvalidInputError("--mask, --edit: choose one (inpainting or instruction editing)")
    if args.image_guidance is not None and not args.edit:
        raise InvalidInputError("--image-guidance: only used with --edit")
    if args.edit and args.strength is not None:
        raise InvalidInputError("--strength: not used by --edit (InstructPix2Pix always starts from noise)")
    if (args.mask or args.edit) and args.guidance_rescale is not None:
        raise InvalidInputError("--guidance-rescale: applies to text-to-image and --init-image sampling only")
    micro = micro_conditioning_from_args(args)
    if (args.mask or args.edit) and micro:
        flag = next(f for f, keyword in {**MICRO_PAIRS, **MICRO_SCORES}.items() if keyword == min(micro))
        raise InvalidInputError(f"--{flag.replace('_', '-')}: SDXL micro-conditioning applies to "
                                "text-to-image and --init-image sampling only")  # fmt: skip


def check_pipeline_takes(pipe: Any, args: argparse.Namespace) -> None:
    """Options this kind of pipeline has no use for are an error rather than silently dropped."""
    import inspect

    from t2i.errors import InvalidInputError

    if args.guidance_rescale is not None and "guidance_rescale" not in inspect.signature(pipe.generate).parameters:
        raise InvalidInputError(f"--guidance-rescale: not used by a {type(pipe).__name__} (SD family only)")


def open_image(path: str, flag: str = "--init-image", mode: str = "RGB") -> Any:
    from PIL import Image, UnidentifiedImageError

    from t2i.errors import InvalidInputError

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, UnidentifiedImageError) as exc:
        raise InvalidInputError(f"{flag} {path}: cannot read image ({exc.__class__.__name__})") from None


def output_paths(out: str, count: int) -> list[Path]:
    """`out` for one image; `stem-0.png`, `stem-1.png`, ... for several."""
    path = Path(out)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]


def is_cascade_folder(path: str) -> bool:
    return any((Path(path) / name).is_file() for name in ("cascade.yaml", "cascade.json"))


def reject_latent_only_options(args: argparse.Namespace) -> None:
    """Options that only the SD pipeline honours: an error for a cascade rather than silently ignored."""
    given = {
        "--init-image": args.init_image,
        "--mask": args.mask,
        "--edit": args.edit or None,
        "--guidance-rescale": args.guidance_rescale,
        "--height": args.height,
        "--width": args.width,
        "--karras": args.karras or None,
        "--eta": args.eta,
        "--config": args.config,
        **{"--" + flag.replace("_", "-"): getattr(args, flag, None) for flag in {**MICRO_PAIRS, **MICRO_SCORES}},
    }
    used = [flag for flag, value in given.items() if value is not None]
    if used:
        from t2i.errors import InvalidInputError

        raise InvalidInputError(
            f"{', '.join(used)}: not available for a cascade (each stage samples at its own size with its own "
            "sampler); drop the option or sample an SD pipeline"
        )


def generate_cascade_from_args(args: argparse.Namespace) -> Any:
    """`--model CASCADE_DIR`: every stage with its own defaults, `--lora` on the stages the files fit."""
    from t2i.pipelines.cascade import load_cascade

    reject_latent_only_options(args)
    cascade = load_cascade(args.model, args.device)
    if args.lora:
        from t2i.lora.inference import load_loras_from_specs

        load_loras_from_specs(cascade, args.lora)
    return cascade.generate(
        list(args.prompt),
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        sampler=args.sampler,
        guidance_scale=args.guidance,
        seed=args.seed or 0,
        num_images=args.num_images,
    )


def run(args: argparse.Namespace) -> int:
    check_output(args.out)
    check_lora_specs(args.lora)
    args.device = resolve_device(args.device)
    if is_cascade_folder(args.model):
        result = generate_cascade_from_args(args)
    else:
        result = generate_from_args(load_from_args(args), args)
    from t2i.atomic import save_image

    paths = output_paths(args.out, len(result.images))
    for image, path in zip(result.images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(image, path)
        print(path)
    return 0
