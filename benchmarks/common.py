"""Timing and memory helpers shared by the benchmark scripts.

Timing: `time_rounds` runs several methods in rounds, rotating which goes first in each round (ABAB...), and
keeps the median per method, so background load on a shared machine lands on every method about equally.

Memory, two numbers per method:
- resident: bytes of the tensors a method keeps between steps (weights, gradients, optimizer state, frozen
  encoders), counted from the tensors themselves, so it is exact and the same on every device;
- step peak: the transient peak above the level before one step. CUDA: `torch.cuda.max_memory_allocated`.
  CPU: the process's resident-set size sampled every 2 ms from /proc (psutil is not needed), after a `gc` and a
  `malloc_trim` so freed heap from the previous step does not hide the new peak. Short spikes between samples
  can be missed, so CPU step peaks are a lower bound, good to ~10%.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIB = 2**20


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(
    steps: dict[str, Callable[[], None]], device: str, warmup: int, repeats: int
) -> dict[str, float]:
    """Median wall seconds per call of each step; round r starts with method r mod n (rotating order)."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Total storage bytes of `tensors`, each distinct storage counted once."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def module_tensors(*modules: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters, their gradients and buffers of `modules`."""
    out: list[torch.Tensor] = []
    for m in modules:
        for p in m.parameters():
            out.append(p)
            if p.grad is not None:
                out.append(p.grad)
        out.extend(m.buffers())
    return out


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The state tensors (Adam moments, step counters) an optimizer holds."""
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def _release_free_heap() -> None:
    """Return freed heap pages to the OS so the RSS baseline is the live data, not allocator caches."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    """Resident-set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class StepPeak:
    """Context manager: `peak_mib` is the peak memory above the level on entry while the block ran."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.peak_mib = 0.0

    def __enter__(self) -> StepPeak:  # noqa: PYI034 (no Self on Python 3.10)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_heap()
        self._start = self._peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, rss_bytes())

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, rss_bytes())
        self.peak_mib = (peak - self._start) / MIB


def step_peak_mib(step: Callable[[], None], device: str) -> float:
    """Peak memory (MiB) above the pre-step level during one call of `step`."""
    with StepPeak(device) as peak:
        step()
    return peak.peak_mib


def machine_line(device: str) -> str:
    """One line naming the hardware the numbers came from."""
    if torch.device(device).type == "cuda":
        return f"device {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    return (
        f"device cpu ({cpu}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}), "
        f"torch {torch.__version__}"
    )


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A plain aligned text table (first column left-aligned, the rest right-aligned)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    print(fmt(headers))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(fmt(r))


# ------------------------------------------------------------------------------------------ FLOPs


def unet_forward_flops(unet_config: dict, batch: int, latent_side: int, context_tokens: int) -> int:
    """Analytic FLOPs (multiply-add = 2) of one t2i `UNetModel` forward at (batch, C, side, side).

    Counts convolutions, linear layers and the two attention matmuls (Q K^T and weights V) per attention
    layer; norms, activations and softmax are left out (well under 1% for SD-size UNets). The forward runs on
    the meta device, so no memory or compute is spent; forward hooks read the actual layer shapes.
    Training (forward + backward) costs 3x this: backward computes gradients for inputs and for weights.
    """
    from t2i.models.attention import CrossAttention
    from t2i.models.unet import AttentionBlock, UNetModel

    with torch.device("meta"):
        model = UNetModel(**{**unet_config, "use_checkpoint": False})
        x = torch.empty(batch, unet_config["in_channels"], latent_side, latent_side)
        t = torch.zeros(batch)
        dim = unet_config.get("context_dim")
        context = None if dim is None else torch.empty(batch, context_tokens, dim)
    total = 0

    def count(module: torch.nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            kernel = int(torch.tensor(module.kernel_size).prod())
            total += 2 * out.numel() * (module.in_channels // module.groups) * kernel
        elif isinstance(module, torch.nn.Linear):
            total += 2 * out.numel() * module.in_features
        elif isinstance(module, CrossAttention):
            queries = args[0]
            keys = kwargs.get("context", args[1] if len(args) > 1 else None)
            keys = queries if keys is None else keys
            inner = module.to_q.out_features
            total += 2 * 2 * queries.shape[0] * queries.shape[1] * keys.shape[1] * inner
        elif isinstance(module, AttentionBlock):
            b, c, h, w = args[0].shape
            total += 2 * 2 * b * (h * w) ** 2 * c

    kinds = (torch.nn.modules.conv._ConvNd, torch.nn.Linear, CrossAttention, AttentionBlock)
    handles = [m.register_forward_hook(count, with_kwargs=True) for m in model.modules() if isinstance(m, kinds)]
    with torch.no_grad():
        model(x, t, context)
    for h in handles:
        h.remove()
    return total
