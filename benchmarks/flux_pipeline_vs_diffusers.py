"""Flux sampling time: t2i `FluxPipeline.generate` against diffusers' `FluxPipeline` on the same random weights.

A random diffusers FluxPipeline (CLIP and T5 text encoders, the transformer, a 16-channel VAE, Euler with Flux's
resolution-dependent shift; built by tests/pipelines/flux_pipeline_helpers.py) is saved once; diffusers reloads that
folder and t2i loads it with `t2i.load_pipeline`. Both sample the same prompts from the same initial latents
(unpacked for t2i, packed for diffusers) with the same steps and embedded guidance; the time covers prompt
encoding, the sampling loop and the VAE decode. Calls are interleaved (ABAB), medians are reported, and the max
image difference shows both did the same work.

    python benchmarks/flux_pipeline_vs_diffusers.py                # mid: hidden 512, 2+4 blocks, 128 px, CPU
    python benchmarks/flux_pipeline_vs_diffusers.py --smoke
    python benchmarks/flux_pipeline_vs_diffusers.py --device cuda --dtype bf16 --size large --steps 28
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

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests" / "pipelines")]
from common import DTYPES, machine_line, print_table, step_peak_mib, time_rounds
from flux_pipeline_helpers import FluxDims, tiny_flux_pipeline

PROMPTS = ["a red circle in the top left", "a blue square"]
# name: (dims, text tokens)
SIZES = {
    "smoke": (FluxDims(), 16),
    "mid": (
        FluxDims(heads=8, head_dim=64, axes=(8, 28, 28), double=2, single=4, text_width=256,
                 vae_channels=(32, 64, 128), size=128),
        64,
    ),
    "large": (
        FluxDims(heads=24, head_dim=128, axes=(16, 56, 56), double=4, single=8, text_width=4096,
                 vae_channels=(128, 256, 512, 512), size=512),
        256,
    ),
}


def load_both(folder: Path, device: str, dtype: torch.dtype, tokens: int):
    import diffusers

    import t2i

    ours = t2i.load_pipeline(folder, device=device, dtype=dtype)
    ours.context_encoder.max_length = tokens
    theirs = diffusers.FluxPipeline.from_pretrained(str(folder), dtype=dtype)
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs.to(device)


def bench_flux_pipeline(
    size: str = "mid", device: str = "cpu", dtype_name: str = "fp32", steps: int = 8, repeats: int = 5,
    warmup: int = 1, guidance_scale: float = 3.5,
) -> dict[str, float]:  # fmt: skip
    """Time and peak memory of t2i vs diffusers Flux sampling; prints a table, returns the numbers."""
    from t2i.models.flux import pack_latents

    dtype = DTYPES[dtype_name]
    dims, tokens = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        tiny_flux_pipeline(guidance=True, dims=dims).save_pretrained(tmp)
        ours, theirs = load_both(Path(tmp), device, dtype, tokens)
    side = dims.size // ours.first_stage.downsample_factor
    latents = torch.randn(len(PROMPTS), 16, side, side, generator=torch.Generator().manual_seed(0))
    outputs: dict[str, np.ndarray] = {}

    def t2i_call() -> None:
        out = ours.generate(PROMPTS, latents=latents.clone(), height=dims.size, width=dims.size, steps=steps,
                            guidance_scale=guidance_scale, progress=False)  # fmt: skip
        outputs["t2i"] = out.pixels.permute(0, 2, 3, 1).float().numpy()

    def diffusers_call() -> None:
        out = theirs(PROMPTS, latents=pack_latents(latents).to(device, dtype), height=dims.size, width=dims.size,
                     num_inference_steps=steps, guidance_scale=guidance_scale, max_sequence_length=tokens,
                     output_type="np")  # fmt: skip
        outputs["diffusers"] = np.asarray(out.images, dtype=np.float32)

    calls: dict[str, Callable[[], None]] = {"t2i": t2i_call, "diffusers": diffusers_call}
    with torch.inference_mode():
        times = time_rounds(calls, device, warmup, repeats)
        peaks = {k: step_peak_mib(call, device) for k, call in calls.items()}
    diff = float(np.abs(outputs["t2i"] - outputs["diffusers"]).max())
    hidden = dims.heads * dims.head_dim
    print(f"\nFlux pipeline {size}: hidden {hidden}, {dims.double}+{dims.single} blocks, {len(PROMPTS)} images of "
          f"{dims.size} px ({(side // 2) ** 2} image + {tokens} text tokens), {steps} Euler steps, embedded guidance "
          f"{guidance_scale}, {dtype_name}; median of {repeats} interleaved calls; max |image diff| {diff:.2e}")
    rows = [[k, f"{times[k] * 1e3:.0f}", f"{len(PROMPTS) / times[k]:.2f}", f"{peaks[k]:.0f}",
             f"{times['diffusers'] / times[k]:.3f}"] for k in calls]  # fmt: skip
    print_table(["library", "ms / call", "images/s", "peak MiB", "speed vs diffusers"], rows)
    ratio = times["diffusers"] / times["t2i"]
    print(f"ratio line: t2i/diffusers Flux sampling speed = {ratio:.3f}")
    return {"t2i_s": times["t2i"], "diffusers_s": times["diffusers"], "ratio": ratio, "max_image_diff": diff}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--size", choices=list(SIZES), default="mid")
    p.add_argument("--steps", type=int, default=8, help="sampling steps")
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
    print(f"Flux sampling: t2i vs diffusers FluxPipeline; {machine_line(args.device)}")
    bench_flux_pipeline(args.size, args.device, args.dtype, args.steps, args.repeats, args.warmup)


if __name__ == "__main__":
    main()
