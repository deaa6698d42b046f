"""Whole-pipeline sampling time: t2i `LatentPipeline.generate` against diffusers' `StableDiffusionPipeline`.

One random pipeline (the UNet and VAE of train_throughput.py's sizes, MiniLM text encoder) is saved once as a
t2i pipeline folder, which is also a diffusers folder; both libraries load that folder and sample with its
scheduler (DDIM), the same initial latents, prompts, steps and guidance scale. The time covers prompt
encoding, the sampling loop with classifier-free guidance, and the VAE decode; the image tensors agree (the
max difference is printed). Calls are interleaved (ABAB), medians are reported.

    python benchmarks/pipeline_vs_diffusers.py                    # mid size, 64 px, 2 images, 20 steps, CPU
    python benchmarks/pipeline_vs_diffusers.py --smoke
    python benchmarks/pipeline_vs_diffusers.py --device cuda --dtype bf16 --size sd2 --steps 30
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DTYPES, machine_line, print_table, step_peak_mib, time_rounds
from train_throughput import SIZES, run_config, sd2_parts

PROMPTS = ["a red circle in the top left", "a blue square in the centre"]


def save_random_pipeline(size: str, resolution: int, folder: Path) -> None:
    """A random t2i pipeline (MiniLM text encoder) of `size`, written with `save_pipeline`."""
    from t2i.pipelines.build import build_text_encoder, build_unet, build_vae
    from t2i.pipelines.loading import assemble_pipeline
    from t2i.pipelines.sd_folder import save_pipeline

    spec = SIZES[size]
    unet, vae = (spec["unet"], spec["vae"]) if spec["unet"] else sd2_parts()
    if size == "sd2":  # MiniLM is the only offline text encoder; the UNet keeps SD2's 1024-d context
        unet = {**unet, "context_dim": 384}
    model = run_config(unet, vae, resolution, 1, spec["tokens"], "32").model
    torch.manual_seed(0)
    pipe = assemble_pipeline(model, build_unet(model), build_vae(model), build_text_encoder(model))
    save_pipeline(pipe, folder)


def load_both(folder: Path, device: str, dtype: torch.dtype):
    import diffusers

    import t2i

    ours = t2i.load_pipeline(folder, device=device, dtype=dtype)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, dtype=dtype)
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs.to(device)


def bench_pipeline(
    size: str = "mid",
    device: str = "cpu",
    dtype_name: str = "fp32",
    steps: int = 20,
    repeats: int = 5,
    warmup: int = 1,
    guidance_scale: float = 7.5,
) -> dict[str, float]:
    """Time and peak memory of t2i vs diffusers sampling; prints a table, returns the numbers."""
    dtype = DTYPES[dtype_name]
    resolution = SIZES[size]["resolutions"][0]
    with tempfile.TemporaryDirectory() as tmp:
        save_random_pipeline(size, resolution, Path(tmp))
        ours, theirs = load_both(Path(tmp), device, dtype)
    factor = ours.first_stage.downsample_factor
    side = resolution // factor
    latents = torch.randn(len(PROMPTS), 4, side, side, generator=torch.Generator().manual_seed(0))
    outputs: dict[str, np.ndarray] = {}

    def t2i_call() -> None:
        out = ours.generate(PROMPTS, latents=latents.clone(), height=resolution, width=resolution, steps=steps,
                            guidance_scale=guidance_scale, progress=False)
        outputs["t2i"] = out.pixels.permute(0, 2, 3, 1).float().numpy()

    def diffusers_call() -> None:
        out = theirs(PROMPTS, latents=latents.clone().to(device, dtype), height=resolution, width=resolution,
                     num_inference_steps=steps, guidance_scale=guidance_scale, output_type="np")
        outputs["diffusers"] = np.asarray(out.images, dtype=np.float32)

    calls: dict[str, Callable[[], None]] = {"t2i": t2i_call, "diffusers": diffusers_call}
    with torch.inference_mode():
        times = time_rounds(calls, device, warmup, repeats)
        peaks = {k: step_peak_mib(call, device) for k, call in calls.items()}
    diff = float(np.abs(outputs["t2i"] - outputs["diffusers"]).max())
    print(f"\npipeline {size}: {len(PROMPTS)} images of {resolution} px, {steps} DDIM steps, CFG {guidance_scale}, "
          f"{dtype_name}; median of {repeats} interleaved calls; max |image diff| {diff:.4f}")
    rows = [[k, f"{times[k] * 1e3:.0f}", f"{len(PROMPTS) / times[k]:.2f}", f"{peaks[k]:.0f}",
             f"{times['diffusers'] / times[k]:.3f}"] for k in calls]
    print_table(["library", "ms / call", "images/s", "peak MiB", "speed vs diffusers"], rows)
    ratio = times["diffusers"] / times["t2i"]
    print(f"ratio line: t2i/diffusers sampling speed = {ratio:.3f}")
    return {"t2i_s": times["t2i"], "diffusers_s": times["diffusers"], "ratio": ratio,
            "t2i_peak_mib": peaks["t2i"], "diffusers_peak_mib": peaks["diffusers"], "max_image_diff": diff}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--size", choices=list(SIZES), default="mid")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--smoke", action="store_true", help="tiny pipeline, 2 steps: checks the script works")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.steps, args.repeats, args.warmup = "smoke", 2, 1, 0
    return args


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"pipeline sampling: t2i vs diffusers StableDiffusionPipeline; {machine_line(args.device)}")
    bench_pipeline(args.size, args.device, args.dtype, args.steps, args.repeats, args.warmup)


if __name__ == "__main__":
    main()
