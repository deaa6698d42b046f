"""Time t2i's SD UNet against diffusers' UNet2DConditionModel holding the same weights.

Reports the median forward and forward+backward time of each (after warmup, rounds interleaved so load
drift hits both), their ratio (t2i / diffusers; below 1 means t2i is faster), and peak memory per step
(GPU: torch.cuda.max_memory_allocated; CPU: peak resident-set growth, sampled).

    python benchmarks/unet_vs_diffusers.py                       # mid-size UNet, 32x32 latent, batch 2, CPU
    python benchmarks/unet_vs_diffusers.py --size sdxl-mid       # SDXL-shaped mid UNet (depths [0,1,2], ADM y)
    python benchmarks/unet_vs_diffusers.py --device cuda --size sd2   # SD2 UNet, 64x64 latent, bf16, batch 8
    python benchmarks/unet_vs_diffusers.py --device cuda --size sdxl  # SDXL base UNet, 128x128 latent, bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from t2i.convert.unet_diffusers import diffusers_to_t2i_state_dict, unet_config_to_diffusers
from t2i.models.layers import size_embedding
from t2i.models.unet import UNetModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import step_peak_mib

MID_CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 128,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4],
    "num_heads": 8,
    "num_head_channels": -1,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": False,
    "transformer_depth": 1,
    "context_dim": 768,
    "use_checkpoint": False,
    "legacy": False,
    "use_flash_attention": True,
    "dropout": 0.0,
}
# SDXL-shaped at CPU size: no transformer at level 0, depths 1 and 2 below, linear projections, 64-wide heads,
# SDXL's 2048-d context and 2816-d ADM vector (1280 pooled + 6 size embeddings of 256).
SDXL_MID_CONFIG = {
    **MID_CONFIG,
    "model_channels": 64,
    "attention_resolutions": [4, 2],
    "channel_mult": [1, 2, 4],
    "num_heads": -1,
    "num_head_channels": 64,
    "use_linear_in_transformer": True,
    "transformer_depth": [0, 1, 2],
    "context_dim": 2048,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
}
SIZE_IDS = 6  # SDXL base micro-conditioning: original size, crop top-left, target size
SIZES = {
    # name: (unet_config or a configs/sd YAML name, latent side, default batch, default dtype, context tokens)
    "mid": (MID_CONFIG, 32, 2, "float32", 77),
    "sdxl-mid": (SDXL_MID_CONFIG, 32, 2, "float32", 77),
    "sd2": ("sd2", 64, 8, "bfloat16", 77),
    "sdxl": ("sdxl", 128, 4, "bfloat16", 77),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Row:
    name: str
    t2i_ms: float
    diffusers_ms: float
    t2i_peak_mb: float
    diffusers_peak_mb: float


def yaml_unet_config(name: str) -> dict:
    path = Path(__file__).resolve().parents[1] / "configs" / "sd" / f"{name}.yaml"
    config = OmegaConf.to_container(OmegaConf.load(path).model.unet_config)
    return {**config, "use_checkpoint": False}


def build_pair(unet_config: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """A diffusers UNet with random weights and a t2i UNetModel holding the same weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    theirs = UNet2DConditionModel(**unet_config_to_diffusers(unet_config))
    ours = UNetModel(**unet_config)
    ours.load_state_dict(diffusers_to_t2i_state_dict(theirs.state_dict(), unet_config))
    return ours.to(device, dtype), theirs.to(device, dtype)


def make_steps(model: torch.nn.Module, call: Callable, inputs: tuple) -> dict[str, Callable[[], None]]:
    """Closures running one forward (no grad) and one forward+backward of `model`."""

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            call(model, *inputs)

    def forward_backward() -> None:
        model.train()
        out = call(model, *inputs)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return {"forward": forward, "forward+backward": forward_backward}


def t2i_call(model, x, t, ctx, text_embeds=None, time_ids=None):
    """t2i's UNet; an ADM (SDXL) UNet gets y = cat(pooled text, size_embedding(time_ids)), built per call as a
    pipeline would."""
    y = None
    if text_embeds is not None:
        y = torch.cat([text_embeds, size_embedding(time_ids).to(text_embeds.dtype)], dim=-1)
    return model(x, t, ctx, y=y)


def diffusers_call(model, x, t, ctx, text_embeds=None, time_ids=None):
    added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
    return model(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added, return_dict=False)[0]


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def time_interleaved(
    step_a: Callable, step_b: Callable, device: str, warmup: int, repeats: int, clock: str = "wall"
):
    """Median seconds of step_a and step_b, alternating which goes first in each round.

    clock "process" counts this process's CPU seconds (all threads), which other jobs on a shared CPU
    machine do not inflate; "wall" is elapsed time.
    """
    now = CLOCKS[clock]

    def timed(step: Callable) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = now()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return now() - start

    for _ in range(warmup):
        step_a()
        step_b()
    times_a, times_b = [], []
    for i in range(repeats):
        if i % 2:
            times_b.append(timed(step_b))
            times_a.append(timed(step_a))
        else:
            times_a.append(timed(step_a))
            times_b.append(timed(step_b))
    return statistics.median(times_a), statistics.median(times_b)


def bench_unet(args: argparse.Namespace) -> list[Row]:
    config, side, batch, dtype_name, tokens = SIZES[args.size]
    config = yaml_unet_config(config) if isinstance(config, str) else config
    dtype = DTYPES[args.dtype or dtype_name]
    batch = args.batch or batch
    ours, theirs = build_pair(config, args.device, dtype)
    if args.compile:
        ours, theirs = torch.compile(ours), torch.compile(theirs)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config["in_channels"], side, side, generator=g).to(args.device, dtype)
    t = torch.randint(0, 1000, (batch,), generator=g).to(args.device)
    ctx = torch.randn(batch, tokens, config["context_dim"], generator=g).to(args.device, dtype)
    inputs: tuple = (x, t, ctx)
    if config.get("num_classes") is not None:
        pooled = torch.randn(batch, config["adm_in_channels"] - SIZE_IDS * 256, generator=g).to(
            args.device, dtype
        )
        time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch).to(args.device)
        inputs = (x, t, ctx, pooled, time_ids)
    steps_ours = make_steps(ours, t2i_call, inputs)
    steps_theirs = make_steps(theirs, diffusers_call, inputs)
    rows = []
    for name in steps_ours:
        a, b = time_interleaved(
            steps_ours[name], steps_theirs[name], args.device, args.warmup, args.repeats, args.clock
        )
        mem_a = step_peak_mib(steps_ours[name], args.device)
        mem_b = step_peak_mib(steps_theirs[name], args.device)
        rows.append(Row(name, a * 1e3, b * 1e3, mem_a, mem_b))
    print(
        f"UNet {args.size}: batch {batch}, latent {side}x{side}, {dtype}, device {args.device}, "
        f"compile {args.compile}, threads {torch.get_num_threads()}, {args.clock} clock, median of {args.repeats}"
    )
    return rows


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n{title}")
    print(
        f"{'step':<18}{'t2i ms':>10}{'diffusers ms':>14}{'ratio':>8}{'t2i peak MiB':>15}{'diff. peak MiB':>16}"
    )
    for r in rows:
        print(
            f"{r.name:<18}{r.t2i_ms:>10.1f}{r.diffusers_ms:>14.1f}{r.t2i_ms / r.diffusers_ms:>8.3f}"
            f"{r.t2i_peak_mb:>15.1f}{r.diffusers_peak_mb:>16.1f}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="default: float32 (mid sizes), bfloat16 (sd2, sdxl)",
    )
    p.add_argument("--size", choices=list(SIZES), default="mid")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--skip-pipeline", action="store_true", help="time only the UNet, not whole-pipeline sampling"
    )
    p.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="process: CPU seconds of this process, robust to other load on a shared CPU box",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print_table("UNet: t2i vs diffusers (ratio = t2i / diffusers)", bench_unet(args))
    if not args.skip_pipeline and args.size in ("mid", "sd2"):  # the pipeline benchmark has no SDXL pipeline
        from pipeline_vs_diffusers import bench_pipeline

        dtype_name = "bf16" if args.size == "sd2" else "fp32"
        bench_pipeline(size="mid" if args.size != "sd2" else "sd2", device=args.device, dtype_name=dtype_name)


if __name__ == "__main__":
    main()
