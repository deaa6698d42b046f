"""Largest image difference between t2i and diffusers' StableDiffusionPipeline, per sampler.

The same tiny random SD1-style (eps) and SD2-style (v prediction) pipelines the parity tests use
(tests/pipelines/sd_helpers.py) are built with diffusers, loaded by `t2i.load_pipeline`, and sampled from the
same initial latents (and the same seed for stochastic samplers) with classifier-free guidance and negative
prompts. Prints one row per (sampler, sigmas): the max |t2i - diffusers| over every pixel (images in [0, 1]).

    python benchmarks/parity_report.py [--steps 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "pipelines"))

from sd_helpers import SIZE, initial_latents, load_diffusers, tiny_diffusers_pipeline

SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
}
KARRAS = ("euler", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde")
PROMPTS = ["a red circle", "circle"]
NEGATIVE = ["red", ""]


def diffusers_pixels(folder: Path, sampler: str, karras: bool, steps: int) -> torch.Tensor:
    import diffusers

    pipe, scheduler = load_diffusers(folder)
    name, extra = SCHEDULERS[sampler]
    if karras:
        extra = {**extra, "use_karras_sigmas": True}
    pipe.scheduler = getattr(diffusers, name).from_config(scheduler.config, **extra)
    out = pipe(
        PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=6.0, height=SIZE,
        width=SIZE, latents=initial_latents(len(PROMPTS)), output_type="np",
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    return torch.from_numpy(out.images)


def t2i_pixels(pipe, sampler: str, karras: bool, steps: int) -> torch.Tensor:
    out = pipe.generate(
        PROMPTS, negative_prompt=NEGATIVE, steps=steps, guidance_scale=6.0, height=SIZE, width=SIZE,
        latents=initial_latents(len(PROMPTS)), sampler=sampler, use_karras_sigmas=karras, progress=False,
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    return out.pixels.permute(0, 2, 3, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    import diffusers

    import t2i

    diffusers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for style in ("sd1", "sd2"):
            folder = Path(tmp) / style
            tiny_diffusers_pipeline(style).save_pretrained(folder)
            ours = t2i.load_pipeline(folder)
            for sampler in SCHEDULERS:
                for karras in (False, True) if sampler in KARRAS else (False,):
                    ref = diffusers_pixels(folder, sampler, karras, args.steps)
                    diff = (t2i_pixels(ours, sampler, karras, args.steps) - ref).abs().max().item()
                    rows.append((style, sampler + (" karras" if karras else ""), diff))
    print(f"| style | sampler | max abs pixel difference ({args.steps} steps) |")
    print("|---|---|---|")
    for style, sampler, diff in rows:
        print(f"| {style} | {sampler} | {diff:.2e} |")


if __name__ == "__main__":
    main()
