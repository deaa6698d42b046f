"""Memory of full SDXL UNet fine-tuning, per option: activation checkpointing, bf16 autocast, the AdamW
implementation (foreach / fused / for-loop) and where the EMA lives (beside the model, on the CPU, or none).

Each option runs t2i's own pieces: `UNetModel` from `configs/sd/sdxl.yaml`'s `unet_config` (with
`use_checkpoint` per option), `t2i.train.optim.build_optimizer` (`model.optim.fused` / `foreach`), gradient
clipping at 1, and `t2i.train.ema.EMA` (`trainer.ema.device`). A training step is the eps-MSE loss of the UNet on
(B, 4, 128, 128) latents (1024 px) with (B, 77, 2048) text context and the (B, 2816) ADM vector, as a precached
SDXL run feeds it (the frozen text encoders and VAE are not loaded; see BENCHMARKS.md for their size).

Two ways to get the numbers:

- ``--device cuda``: measured. Peak of `torch.cuda.max_memory_allocated` over the second training step (the
  first creates the AdamW state), plus the resident bytes of weights, gradients, AdamW state and EMA.
- default (no GPU needed): computed. The same code runs on fake tensors (`torch._subclasses.FakeTensorMode`: shapes
  and dtypes, no data, no arithmetic) under a dispatch mode that plays allocator: every storage an op creates is
  added when created and removed when Python frees it (a weakref callback on the storage), so the peak of the
  sum is the peak of the bytes a caching allocator would hand out, without fragmentation, kernel workspaces or
  the CUDA context. bf16 autocast runs as CPU autocast with CUDA's policy for the norms (group_norm and
  layer_norm in float32); attention runs torch's CPU flash-attention kernel, which keeps what the CUDA
  flash / memory-efficient kernels keep for backward (q, k, v, output and the float32 log-sum-exp).

    python benchmarks/sdxl_memory.py                     # the table in BENCHMARKS.md (a few minutes on CPU)
    python benchmarks/sdxl_memory.py --smoke             # tiny SDXL-shaped UNet, seconds; checks the script runs
    python benchmarks/sdxl_memory.py --device cuda       # measured on a GPU, same table
    python benchmarks/sdxl_memory.py --device cuda --batch-size 4 --options bf16-ckpt-fused-ema_cpu
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table

GIB = 1024**3


@dataclass(frozen=True)
class Option:
    """One memory configuration of a full fine-tuning step."""

    precision: str  # "32" | "bf16"
    checkpointing: bool
    optimizer: str  # "foreach" | "fused" | "forloop"
    ema: str  # "device" | "cpu" | "off"

    @property
    def name(self) -> str:
        ckpt = "ckpt" if self.checkpointing else "nockpt"
        return f"{'fp32' if self.precision == '32' else 'bf16'}-{ckpt}-{self.optimizer}-ema_{self.ema}"

    def keys(self) -> str:
        """The config keys that select this option."""
        optim = {"foreach": "model.optim.foreach=true", "fused": "model.optim.fused=true",
                 "forloop": "model.optim.foreach=false"}[self.optimizer]  # fmt: skip
        ema = {"device": "trainer.ema.device=null", "cpu": "trainer.ema.device=cpu",
               "off": "trainer.ema.enabled=false"}[self.ema]  # fmt: skip
        return (f"trainer.precision={self.precision} model.unet_config.use_checkpoint={self.checkpointing} "
                f"{optim} {ema}")  # fmt: skip


OPTIONS = [
    Option("32", False, "foreach", "device"),
    Option("bf16", False, "foreach", "device"),
    Option("bf16", True, "foreach", "device"),
    Option("bf16", True, "forloop", "device"),
    Option("bf16", True, "fused", "device"),
    Option("bf16", True, "fused", "cpu"),
    Option("bf16", True, "fused", "off"),
    Option("32", True, "fused", "cpu"),
]


def unet_kwargs(smoke: bool, checkpointing: bool) -> dict:
    """SDXL's UNet keyword arguments (a tiny SDXL-shaped UNet with --smoke)."""
    from t2i.config import load_config

    kwargs = load_config("sdxl").model.unet_config.model_kwargs()
    if smoke:
        kwargs |= {"model_channels": 32, "num_head_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                   "attention_resolutions": [2], "transformer_depth": [0, 1], "context_dim": 64,
                   "adm_in_channels": 96}  # fmt: skip
    return kwargs | {"use_checkpoint": checkpointing}


# --------------------------------------------------------------------------------------------- the step


@contextlib.contextmanager
def cuda_norm_policy() -> Iterator[None]:
    """Run group_norm / layer_norm in float32 under autocast, as CUDA autocast does (CPU autocast runs them in
    the lower precision), so a CPU simulation keeps what a GPU run keeps."""
    group_norm, layer_norm = F.group_norm, F.layer_norm

    def fp32(fn):
        def run(x, *args, **kwargs):
            args = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
            kwargs = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            with torch.autocast("cpu", enabled=False):
                return fn(x.float(), *args, **kwargs)

        return run

    F.group_norm, F.layer_norm = fp32(group_norm), fp32(layer_norm)
    try:
        yield
    finally:
        F.group_norm, F.layer_norm = group_norm, layer_norm


class Trainee:
    """The UNet, its optimizer and EMA for one option; `step()` is one full training step."""

    def __init__(self, option: Option, smoke: bool, batch: int, side: int, device: str) -> None:
        from t2i.config import OptimConfig
        from t2i.models.unet import UNetModel
        from t2i.train.ema import EMA
        from t2i.train.optim import build_optimizer

        self.option, self.device = option, torch.device(device)
        kwargs = unet_kwargs(smoke, option.checkpointing)
        self.unet = UNetModel(**kwargs).train()
        if self.device.type != "cpu":  # (fake tensors are built on the CPU and cannot be moved)
            self.unet.to(self.device)
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        implementation = {"foreach": {"foreach": True}, "fused": {"fused": True}, "forloop": {"foreach": False}}
        self.optimizer = build_optimizer(self.params, OptimConfig(lr=1e-5, **implementation[option.optimizer]))
        self.ema = None
        if option.ema != "off":
            state = {k: v.detach() for k, v in self.unet.state_dict().items()}
            self.ema = EMA(state, 0.9999, device="cpu" if option.ema == "cpu" else None)
        gen = torch.Generator(self.device).manual_seed(0) if self.device.type == "cuda" else None
        latent, tokens = side // 8, 77
        self.x = torch.randn(batch, 4, latent, latent, device=self.device, generator=gen)
        self.noise = torch.randn(batch, 4, latent, latent, device=self.device, generator=gen)
        self.t = torch.randint(0, 1000, (batch,), device=self.device, generator=gen)
        self.context = torch.randn(batch, tokens, kwargs["context_dim"], device=self.device, generator=gen)
        self.y = torch.randn(batch, kwargs["adm_in_channels"], device=self.device, generator=gen)
        self.steps = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.option.precision == "32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def forward(self) -> torch.Tensor:
        with self.autocast():
            out = self.unet(self.x, self.t, context=self.context, y=self.y)
            return F.mse_loss(out.float(), self.noise)

    def update(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if self.ema is not None:
            self.ema.update({k: v.detach() for k, v in self.unet.state_dict().items()}, self.steps)

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of weights, AdamW state and (device) EMA between steps."""
        weights = sum(p.numel() * p.element_size() for p in self.unet.parameters())
        weights += sum(b.numel() * b.element_size() for b in self.unet.buffers())
        states = sum(v.numel() * v.element_size() for s in self.optimizer.state.values() for v in s.values()
                     if torch.is_tensor(v) and v.dim() > 0)  # fmt: skip
        ema = 0 if self.ema is None or self.option.ema == "cpu" else weights
        return {"weights": weights, "adam": states, "ema": ema}


# --------------------------------------------------------------------------------------------- computed


class LiveStorages(TorchDispatchMode):
    """Plays allocator: adds each new storage's bytes when an op creates it, removes them when it is freed."""

    def __init__(self, untracked: list[torch.Tensor]) -> None:
        super().__init__()
        self._untracked = {id(t.untyped_storage()) for t in untracked}
        self._keep = [t.untyped_storage() for t in untracked]  # so their ids are not reused
        self._refs: dict[int, weakref.ref] = {}
        self.current = self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.current

    def _free(self, key: int, nbytes: int) -> None:
        self._refs.pop(key, None)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key in self._refs or key in self._untracked:
                    continue
                nbytes = storage.nbytes()
                self._refs[key] = weakref.ref(storage, lambda _, key=key, nbytes=nbytes: self._free(key, nbytes))
                self.current += nbytes
                self.peak = max(self.peak, self.current)
        return out


def computed(option: Option, smoke: bool, batch: int, side: int) -> dict[str, float]:
    """Bytes of one option from the simulated allocator over fake tensors (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), cuda_norm_policy():
        torch.manual_seed(0)
        trainee = Trainee(option, smoke, batch, side, "cpu")
        untracked = list(trainee.unet.parameters()) + list(trainee.unet.buffers())
        untracked += list(trainee.ema.shadow.values()) if trainee.ema is not None else []
        with LiveStorages(untracked) as live:
            trainee.forward().backward()
            trainee.update()  # creates the AdamW state
            base = live.current  # AdamW state (+ the inputs)
            live.reset_peak()
            loss = trainee.forward()
            saved = live.current - base
            loss.backward()
            del loss
            backward_peak = live.peak
            live.reset_peak()
            trainee.update()
            step_peak = live.peak
        resident = trainee.resident_bytes()
    return summary(resident, saved, backward_peak - base, step_peak - base)


def measured(option: Option, smoke: bool, batch: int, side: int) -> dict[str, float]:
    """Bytes of one option measured with torch.cuda.max_memory_allocated."""
    torch.cuda.empty_cache()
    trainee = Trainee(option, smoke, batch, side, "cuda")
    trainee.forward().backward()
    trainee.update()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = trainee.forward()
    torch.cuda.synchronize()
    saved = torch.cuda.memory_allocated() - base
    loss.backward()
    del loss
    torch.cuda.synchronize()
    backward_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    trainee.update()
    torch.cuda.synchronize()
    step_peak = torch.cuda.max_memory_allocated()
    resident = trainee.resident_bytes()
    del trainee
    return summary(resident, saved, backward_peak - base, step_peak - base)


def summary(resident: dict[str, int], saved: int, backward: int, step: int) -> dict[str, float]:
    """GiB per part. `saved`: what the forward keeps for backward (activations, autocast weight copies);
    `backward` / `step`: in-step peaks above the resident part (gradients included); the peak is the resident
    part plus the larger of the two."""
    static = resident["weights"] + resident["adam"] + resident["ema"]
    return {k: v / GIB for k, v in resident.items()} | {
        "saved": saved / GIB, "fwd_bwd": backward / GIB, "optim_step": step / GIB,
        "peak": (static + max(backward, step)) / GIB,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu = computed over fake tensors; cuda = measured")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--options", default=None, help="comma-separated option names (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny SDXL-shaped UNet at 64 px")
    args = parser.parse_args(argv)
    side = 64 if args.smoke else args.resolution
    chosen = OPTIONS if args.options is None else [o for o in OPTIONS if o.name in args.options.split(",")]
    how = "measured (torch.cuda.max_memory_allocated)" if args.device == "cuda" else "computed (fake tensors)"
    print(f"SDXL UNet full fine-tuning, batch {args.batch_size} at {side} px, {how}, torch {torch.__version__}")
    rows, results = [], {}
    for option in chosen:
        started = time.perf_counter()
        run = measured if args.device == "cuda" else computed
        r = results[option.name] = run(option, args.smoke, args.batch_size, side)
        rows.append([option.name, f"{r['weights']:.2f}", f"{r['adam']:.2f}", f"{r['ema']:.2f}",
                     f"{r['saved']:.2f}", f"{r['fwd_bwd']:.2f}", f"{r['optim_step']:.2f}",
                     f"**{r['peak']:.1f}**"])  # fmt: skip
        print(f"  {option.name}: {time.perf_counter() - started:.1f} s; keys: {option.keys()}", flush=True)
    headers = ["option", "weights", "AdamW state", "EMA (device)", "saved by forward", "fwd+bwd peak",
               "optimizer-step peak", "peak (GiB)"]  # fmt: skip
    print_table(headers, rows)
    return results


if __name__ == "__main__":
    main()
