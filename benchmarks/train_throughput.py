"""Training throughput and memory: t2i's LatentDiffusionTask against the diffusers example-script method.

Methods (the same UNet weights, VAE weights, text encoder, batches, batch size and precision):
- diffusers online: what diffusers' `examples/text_to_image/train_text_to_image.py` does per step: a
  `UNet2DConditionModel`, the diffusers `AutoencoderKL` encoding pixels (`latent_dist.sample() *
  scaling_factor`), the text encoder run on pre-tokenized ids (the script tokenizes in its dataloader),
  `DDPMScheduler.add_noise`, eps-MSE loss, backward, grad-norm clip, AdamW step.
- t2i online: `LatentDiffusionTask.training_loss` on images + captions (VAE and MiniLM run every step),
  then the trainer's backward / clip / AdamW step.
- t2i precached: the same task fed VAE moments + text embeddings computed once ahead (`t2i precache`);
  the one-time encoding pass is not in the step time.
- diffusers precached: the diffusers UNet step on the same precached latents/embeddings (the apples-to-apples
  partner of t2i precached).
EMA is off on both sides. Data are preloaded batches of the captioned-shapes dataset, so the data loader is
not timed. Step times are medians over rounds that rotate the method order (see common.py).

    python benchmarks/train_throughput.py                 # mid size, 64 px, batch 8, CPU fp32
    python benchmarks/train_throughput.py --smoke         # seconds; checks the script runs
    python benchmarks/train_throughput.py --device cuda --dtype bf16 --size sd2 --compile   # images/s/GPU, MFU
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DTYPES,
    MIB,
    machine_line,
    module_tensors,
    optimizer_tensors,
    print_table,
    step_peak_mib,
    tensor_bytes,
    time_rounds,
    unet_forward_flops,
)

REPO = Path(__file__).resolve().parents[1]
H100_BF16_DENSE_FLOPS = 989e12
DEMO_VAE = {"double_z": True, "z_channels": 4, "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 2],
            "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def small_unet(channels: int, mult: list[int]) -> dict:
    return {"in_channels": 4, "out_channels": 4, "model_channels": channels, "attention_resolutions": [1, 2, 4],
            "num_res_blocks": 1, "channel_mult": mult, "num_heads": 4, "use_spatial_transformer": True,
            "context_dim": 384, "legacy": False, "use_flash_attention": True}


# name: unet_config, VAE ddconfig, pixel resolutions, default batch, text max_length
SIZES: dict[str, dict] = {
    "smoke": {"unet": small_unet(32, [1, 2]), "vae": DEMO_VAE, "resolutions": [32], "batch": 2, "tokens": 8},
    "mid": {"unet": small_unet(64, [1, 2, 2]), "vae": DEMO_VAE, "resolutions": [64], "batch": 8, "tokens": 16},
    "sd2": {"unet": None, "vae": None, "resolutions": [256, 512], "batch": 8, "tokens": 77},
}


@dataclass
class Method:
    """One training method: `step()` runs one optimizer step; `resident()` lists the tensors it keeps."""

    step: Callable[[], None]
    resident: Callable[[], list[torch.Tensor]]
    unet: torch.nn.Module


def sd2_parts() -> tuple[dict, dict]:
    from omegaconf import OmegaConf

    model = OmegaConf.load(REPO / "configs" / "sd" / "sd2.yaml").model
    unet = {**OmegaConf.to_container(model.unet_config), "use_checkpoint": False}
    return unet, OmegaConf.to_container(model.first_stage_config.ddconfig)


def run_config(unet: dict, vae: dict, resolution: int, batch: int, tokens: int, precision: str):
    """A t2i RunConfig (online data path) for the benchmark model."""
    from t2i.config import build_config

    model = {"kind": "latent_diffusion", "unet_config": unet, "scale_factor": 0.18215, "text_drop_rate": 0.1,
             "first_stage_config": {"embed_dim": 4, "ddconfig": {**vae, "resolution": resolution}},
             "cond_stage_config": {"kind": "minilm", "max_length": tokens}, "optim": {"lr": 1e-4}}
    raw = {"model": model, "data": {"train": [], "resolution": resolution, "batch_size": batch},
           "trainer": {"precision": precision, "max_steps": 1, "ema": {"enabled": False}}}
    return build_config(raw)


def shapes_batches(resolution: int, batch: int, count: int) -> list[dict]:
    """`count` batches {"images" (B, 3, R, R) in [-1, 1], "captions"} of the captioned-shapes dataset."""
    from t2i.data.readers import build_dataset
    from t2i.data.shapes import write_shapes_dataset

    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shapes_dataset(tmp, batch * count, resolution, seed=0, shard_size=batch * count)
        samples = list(build_dataset([str(s) for s in shards], resolution, rank=0, world_size=1, shuffle=False))
    return [
        {"images": torch.stack([s["images"] for s in samples[i : i + batch]]),
         "captions": [s["captions"] for s in samples[i : i + batch]]}
        for i in range(0, len(samples), batch)
    ]


def precache(task, batches: list[dict], device: str) -> list[dict]:
    """VAE moments and token embeddings of each batch, computed once (what `t2i precache` stores)."""
    out = []
    with torch.no_grad():
        for b in batches:
            mean, logvar = task.first_stage.encode_moments(b["images"].to(device))
            emb = task.text_encoder.encode(b["captions"]).embeddings
            out.append({"image_encoded": {"mean": mean, "logvar": logvar},
                        "captions_encoded": {"embeddings": emb}})
    return out


def synthetic_precached(unet: dict, resolution: int, batch: int, tokens: int, count: int, device: str) -> list:
    """Random moments / embeddings of the right shapes (SD2 size has no offline SD2 text encoder)."""
    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    return [{"image_encoded": {"mean": torch.randn(batch, 4, side, side, generator=g).to(device),
                               "logvar": torch.full((batch, 4, side, side), -4.0).to(device)},
             "captions_encoded": {"embeddings": torch.randn(batch, tokens, unet["context_dim"], generator=g)
                                  .to(device)}}
            for _ in range(count)]


def autocast(device: str, dtype: torch.dtype):
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)


def optimizer_step(loss: torch.Tensor, params: list, optimizer: torch.optim.Optimizer, clip: float) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def t2i_method(task, batches: list[dict], cfg, device: str, dtype: torch.dtype, frozen: list) -> Method:
    """The t2i trainer's step: autocast forward of `task.training_loss`, backward, clip, AdamW."""
    from t2i.train.optim import build_optimizer

    params = task.trainable_parameters()
    optimizer = build_optimizer(params, cfg.model.optim)
    generator = torch.Generator(device).manual_seed(0)
    counter = iter(range(10**9))

    def step() -> None:
        batch = batches[next(counter) % len(batches)]
        with autocast(device, dtype):
            loss = task.training_loss(batch, generator)
        optimizer_step(loss, params, optimizer, cfg.trainer.grad_clip)

    return Method(step, lambda: module_tensors(task.unet, *frozen) + optimizer_tensors(optimizer), task.unet)


def diffusers_unet(t2i_unet: torch.nn.Module, unet_config: dict):
    from diffusers import UNet2DConditionModel

    from t2i.convert.unet_diffusers import t2i_to_diffusers_state_dict, unet_config_to_diffusers

    theirs = UNet2DConditionModel(**unet_config_to_diffusers(unet_config))
    theirs.load_state_dict(t2i_to_diffusers_state_dict(t2i_unet.state_dict(), unet_config))
    return theirs.to(next(t2i_unet.parameters()).device).train()


def diffusers_vae(t2i_vae: torch.nn.Module, scale_factor: float):
    from diffusers import AutoencoderKL

    from t2i.convert.vae_diffusers import config_to_diffusers, state_dict_to_diffusers

    config = config_to_diffusers({**t2i_vae.config_dict(), "scale_factor": scale_factor})
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    vae = AutoencoderKL(**config)
    vae.load_state_dict(state_dict_to_diffusers(t2i_vae.state_dict()))
    return vae.to(next(t2i_vae.parameters()).device).requires_grad_(False)


def diffusers_method(unet, batches: list[dict], cfg, device: str, dtype: torch.dtype,
                     vae=None, text_model=None, tokenizer=None) -> Method:
    """train_text_to_image.py's step; with `vae`/`text_model` None it takes precached moments/embeddings."""
    from diffusers import DDPMScheduler

    m = cfg.model
    scheduler = DDPMScheduler(num_train_timesteps=m.timesteps, beta_start=m.linear_start, beta_end=m.linear_end,
                              beta_schedule=m.beta_schedule)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=m.optim.lr, betas=tuple(m.optim.betas), eps=m.optim.eps,
                                  weight_decay=m.optim.weight_decay)
    frozen_dtype = dtype if torch.device(device).type == "cuda" else torch.float32  # the script's weight_dtype
    frozen = [x if frozen_dtype == torch.float32 else x.to(frozen_dtype) for x in (vae, text_model) if x is not None]
    if tokenizer is not None:  # the script tokenizes in its dataset transform, outside the step
        batches = [{**b, "input_ids": tokenizer(b["captions"], padding="max_length", truncation=True,
                                                 max_length=m.cond_stage_config.max_length,
                                                 return_tensors="pt").input_ids.to(device)} for b in batches]
    counter = iter(range(10**9))

    def latents_and_states(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if vae is None:
            mean, logvar = batch["image_encoded"]["mean"], batch["image_encoded"]["logvar"]
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
            return z * m.scale_factor, batch["captions_encoded"]["embeddings"]
        pixels = batch["images"].to(device, frozen_dtype)
        z = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        return z, text_model(batch["input_ids"], return_dict=False)[0]

    def step() -> None:
        batch = batches[next(counter) % len(batches)]
        with autocast(device, dtype):
            latents, states = latents_and_states(batch)
            noise = torch.randn_like(latents)
            t = torch.randint(0, m.timesteps, (latents.shape[0],), device=latents.device).long()
            noisy = scheduler.add_noise(latents, noise, t)
            pred = unet(noisy, t, states, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        optimizer_step(loss, params, optimizer, cfg.trainer.grad_clip)

    return Method(step, lambda: module_tensors(unet, *frozen) + optimizer_tensors(optimizer), unet)


def build_methods(args: argparse.Namespace, resolution: int) -> tuple[dict[str, Method], dict, int]:
    """All methods at one resolution, sharing weights; returns (methods, unet_config, latent side)."""
    from t2i.train.tasks.latent import LatentDiffusionTask

    size = SIZES[args.size]
    unet_cfg, vae_cfg = (size["unet"], size["vae"]) if size["unet"] else sd2_parts()
    batch, tokens = args.batch_size or size["batch"], size["tokens"]
    precision = {"fp32": "32", "bf16": "bf16", "fp16": "fp16"}[args.dtype]
    dtype, device = DTYPES[args.dtype], args.device
    cfg = run_config(unet_cfg, vae_cfg, resolution, batch, tokens, precision)
    pre_cfg = copy.deepcopy(cfg)
    pre_cfg.model.first_stage_key, pre_cfg.model.cond_stage_key = "image_encoded", "captions_encoded"
    torch.manual_seed(0)
    methods: dict[str, Method] = {}
    pre = LatentDiffusionTask(pre_cfg).to(device)
    if args.size == "sd2":  # no SD2 text encoder offline: UNet-only comparison on precached inputs
        cached = synthetic_precached(unet_cfg, resolution, batch, tokens, 2, device)
    else:
        online = LatentDiffusionTask(cfg).to(device)
        online.unet.load_state_dict(pre.unet.state_dict())
        images = shapes_batches(resolution, batch, 2)
        cached = precache(online, images, device)
        text = online.text_encoder
        methods["diffusers online"] = diffusers_method(
            diffusers_unet(pre.unet, unet_cfg), images, cfg, device, dtype,
            vae=diffusers_vae(online.first_stage.vae, cfg.model.scale_factor),
            text_model=copy.deepcopy(text.model).requires_grad_(False).eval(), tokenizer=text.tokenizer)
        methods["t2i online"] = t2i_method(online, images, cfg, device, dtype, [online.first_stage, text])
    methods["diffusers precached"] = diffusers_method(diffusers_unet(pre.unet, unet_cfg), cached, cfg, device, dtype)
    methods["t2i precached"] = t2i_method(pre, cached, pre_cfg, device, dtype, [])
    if args.compile:  # in place, as the t2i trainer does with model.inductor
        for method in methods.values():
            method.unet.compile()
    return methods, unet_cfg, resolution // (8 if args.size == "sd2" else 4)


def bench_resolution(args: argparse.Namespace, resolution: int) -> None:
    methods, unet_cfg, side = build_methods(args, resolution)
    batch = args.batch_size or SIZES[args.size]["batch"]
    times = time_rounds({k: m.step for k, m in methods.items()}, args.device, args.warmup, args.steps)
    peaks = {k: step_peak_mib(m.step, args.device) for k, m in methods.items()}
    resident = {k: tensor_bytes(m.resident()) / MIB for k, m in methods.items()}
    train_flops = 3 * unet_forward_flops(unet_cfg, batch, side, SIZES[args.size]["tokens"])
    print(f"\n{args.size} UNet, {resolution} px (latent {side}x{side}), batch {batch}, {args.dtype}, "
          f"compile {args.compile}; median of {args.steps} rotated rounds after {args.warmup} warmup")
    rows = []
    for name in methods:
        partner = "diffusers online" if "online" in name else "diffusers precached"
        mfu = train_flops / times[name] / H100_BF16_DENSE_FLOPS
        rows.append([name, f"{times[name] * 1e3:.1f}", f"{batch / times[name]:.2f}",
                     f"{resident[name]:.0f}", f"{peaks[name]:.0f}",
                     f"{times[partner] / times[name]:.3f}", f"{100 * mfu:.1f}%" if args.device == "cuda" else "-"])
    print_table(["method", "step ms", "images/s", "resident MiB", "step peak MiB", "speed vs diffusers", "MFU"],
                rows)
    if "t2i online" in methods:
        print(f"t2i precached vs t2i online: {times['t2i online'] / times['t2i precached']:.3f}x images/s")
    print(f"ratio line: t2i/diffusers speed (precached) = {times['diffusers precached'] / times['t2i precached']:.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--size", choices=list(SIZES), default="mid")
    p.add_argument("--resolution", type=int, action="append", help="pixels (repeatable); default per size")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=10, help="timed rounds per method")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet of every method")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 rounds: checks the script works")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.steps, args.warmup = "smoke", 1, 0
    return args


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"training throughput: t2i vs diffusers' train_text_to_image.py method; {machine_line(args.device)}")
    for resolution in args.resolution or SIZES[args.size]["resolutions"]:
        bench_resolution(args, resolution)


if __name__ == "__main__":
    main()
