"""Time t2i's Flux transformer against diffusers' FluxTransformer2DModel holding the same random weights.

Both get the same packed tokens, position ids, text, pooled vector, timesteps and guidance. Reports the median
forward and forward+backward time (rounds interleaved so load drift hits both), the ratio t2i / diffusers
(below 1: t2i is faster), the peak memory of one step, and the max output difference as a check that both did
the same work.

    python benchmarks/flux_vs_diffusers.py                        # mid: hidden 512, 2+4 blocks, 32x32 latent, CPU
    python benchmarks/flux_vs_diffusers.py --device cuda --size large --dtype bfloat16
    python benchmarks/flux_vs_diffusers.py --smoke                # tiny, checks the script runs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from t2i.convert.flux_diffusers import load_flux_transformer
from t2i.models.flux import FluxTransformer, image_position_ids, pack_latents

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import step_peak_mib
from unet_vs_diffusers import CLOCKS, DTYPES, Row, make_steps, print_table, time_interleaved

# name: (diffusers config, latent side, batch, text tokens)
SIZES = {
    "smoke": (
        {
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 16,
            "num_attention_heads": 4,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 16,
            "axes_dims_rope": [4, 6, 6],
        },
        8,
        1,
        8,
    ),
    "mid": (
        {
            "num_layers": 2,
            "num_single_layers": 4,
            "attention_head_dim": 64,
            "num_attention_heads": 8,
            "joint_attention_dim": 512,
            "pooled_projection_dim": 768,
            "axes_dims_rope": [8, 28, 28],
        },
        32,
        2,
        64,
    ),
    "large": (
        {
            "num_layers": 4,
            "num_single_layers": 8,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
        },
        64,
        4,
        256,
    ),
}


def build_pair(size: str, device: str, dtype: torch.dtype):
    """A diffusers FluxTransformer2DModel (guidance embedding on) and our model loaded from its saved folder."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    config = {"patch_size": 1, "in_channels": 64, "guidance_embeds": True, **SIZES[size][0]}
    theirs = FluxTransformer2DModel(**config)
    with torch.no_grad():  # random weights of one fixed scale for every size
        for p in theirs.parameters():
            p.normal_(0.0, 0.02 if p.ndim > 1 else 0.1)
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours = load_flux_transformer(folder)
    return ours.to(device, dtype), theirs.to(device, dtype)


def make_inputs(size: str, device: str, dtype: torch.dtype):
    config, side, batch, tokens = SIZES[size]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 16, side, side, generator=g)
    rows = side // 2
    return {
        "img": pack_latents(x).to(device, dtype),
        "img_ids": image_position_ids(1, rows, rows)[0].to(device),
        "txt": torch.randn(batch, tokens, config["joint_attention_dim"], generator=g).to(device, dtype),
        "txt_ids": torch.zeros(tokens, 3, device=device),
        "y": torch.randn(batch, config["pooled_projection_dim"], generator=g).to(device, dtype),
        "t": torch.rand(batch, generator=g).to(device),
        "guidance": torch.full((batch,), 3.5, device=device),
    }


def t2i_call(model: FluxTransformer, b: dict) -> torch.Tensor:
    n = b["img"].shape[0]
    img_ids = b["img_ids"].expand(n, -1, -1)
    txt_ids = b["txt_ids"].expand(n, -1, -1)
    return model.forward_tokens(b["img"], img_ids, b["txt"], txt_ids, b["t"], b["y"], b["guidance"])


def diffusers_call(model, b: dict) -> torch.Tensor:
    return model(
        b["img"],
        b["txt"],
        b["y"],
        b["t"],
        b["img_ids"],
        b["txt_ids"],
        guidance=b["guidance"],
        return_dict=False,
    )[0]


def bench_flux(args: argparse.Namespace) -> tuple[list[Row], float]:
    dtype = DTYPES[args.dtype]
    ours, theirs = build_pair(args.size, args.device, dtype)
    if args.checkpoint:
        ours.use_checkpoint = True
        theirs.enable_gradient_checkpointing()
    b = make_inputs(args.size, args.device, dtype)
    with torch.no_grad():
        diff = (t2i_call(ours, b).float() - diffusers_call(theirs, b).float()).abs().max().item()
    steps_ours = make_steps(ours, t2i_call, (b,))
    steps_theirs = make_steps(theirs, diffusers_call, (b,))
    rows = []
    for name in steps_ours:
        a, c = time_interleaved(
            steps_ours[name], steps_theirs[name], args.device, args.warmup, args.repeats, args.clock
        )
        rows.append(
            Row(
                name,
                a * 1e3,
                c * 1e3,
                step_peak_mib(steps_ours[name], args.device),
                step_peak_mib(steps_theirs[name], args.device),
            )
        )
    config, side, batch, tokens = SIZES[args.size]
    hidden = config["attention_head_dim"] * config["num_attention_heads"]
    params = sum(p.numel() for p in ours.parameters())
    print(
        f"Flux {args.size}: hidden {hidden}, {config['num_layers']}+{config['num_single_layers']} blocks, "
        f"{params / 1e6:.1f}M params, batch {batch}, latent {side}x{side} ({(side // 2) ** 2} image + {tokens} "
        f"text tokens), {dtype}, device {args.device}, checkpointing {args.checkpoint}, threads "
        f"{torch.get_num_threads()}, {args.clock} clock, median of {args.repeats}"
    )
    return rows, diff


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--size", choices=list(SIZES), default="mid")
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing in both models")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall")
    p.add_argument("--smoke", action="store_true", help="tiny model, one round: checks the script works")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.warmup, args.repeats = "smoke", 0, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, diff = bench_flux(args)
    print_table("Flux transformer: t2i vs diffusers (ratio = t2i / diffusers)", rows)
    print(f"max |output diff| {diff:.2e}")
    train = rows[-1]
    print(f"ratio line: t2i/diffusers forward+backward time = {train.t2i_ms / train.diffusers_ms:.3f}")


if __name__ == "__main__":
    main()
