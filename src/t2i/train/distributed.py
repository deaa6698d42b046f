"""Multi-process training through torch.distributed only: `torchrun --nproc_per_node N -m t2i.cli.main train ...`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them the run is a single
process and every helper here is a no-op. Backend: NCCL on CUDA, gloo on CPU.

Orphans. A worker started by torchrun watches its launcher: if the launcher dies (kill -9 leaves its
workers running, still training and writing checkpoints), the worker prints one line and exits within about a
second. A watchdog thread polls the parent PID rather than using PR_SET_PDEATHSIG, which fires when the
*thread* that spawned the worker exits and is Linux-only. The exit is immediate (`os._exit`): the main thread
may be blocked in a collective that will never complete, and checkpoints are crash-safe by construction.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # True when init_distributed created the process group (and must destroy it)
    watchdog: threading.Event | None = None  # set to stop the launcher watchdog (torchrun workers only)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistContext:
    """Join the process group described by the torchrun environment (or reuse an initialised one)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ  # torchrun, even with one process
    if not launched and world_size <= 1 and not dist.is_initialized():
        return DistContext(device=device)
    watchdog = watch_launcher(int(os.environ.get("RANK", "0")))
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
        owns = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, owns, watchdog)


def cleanup_distributed(ctx: DistContext) -> None:
    if ctx.watchdog is not None:
        ctx.watchdog.set()
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    """True in a worker process that torchrun (torch.distributed.run / elastic agent) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def watch_launcher(rank: int, poll_s: float = 0.5) -> threading.Event | None:
    """Under torchrun, exit this process (status 1, one line on stderr) once its launcher is gone.

    Returns the Event that stops the watchdog, or None outside torchrun (a single `t2i train` must survive
    its shell, e.g. under nohup, so it is never watched).
    """
    if not launched_by_torchrun():
        return None
    launcher = os.getppid()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(poll_s):
            if os.getppid() != launcher:
                sys.stderr.write(f"t2i train: error: rank {rank}: the torchrun launcher (pid {launcher}) is gone; "
                                 "stopping this worker\n")
                sys.stderr.flush()
                os._exit(1)

    threading.Thread(target=watch, name="t2i-launcher-watchdog", daemon=True).start()
    return stop


def check_strategy(strategy: str, ctx: DistContext) -> None:
    """Warn when FSDP runs in a single process: there is nothing to shard."""
    if strategy == "fsdp" and not dist.is_initialized():
        import warnings

        warnings.warn("trainer.strategy=fsdp outside torchrun: one process has nothing to shard, training "
                      "unsharded (launch with torchrun --nproc_per_node N to shard)", stacklevel=3)


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()


def wrap_model(task: nn.Module, ctx: DistContext, strategy: str) -> nn.Module:
    """DDP around the task, or the task with its backbone sharded per block by FSDP2 (`t2i.train.sharding`); the
    loop calls what this returns, so gradients are synchronised in backward.

    Frozen parameters (requires_grad False) are not synchronised by DDP and not sharded by FSDP.
    """
    if not dist.is_initialized():
        return task
    if strategy == "fsdp":
        from t2i.train.sharding import shard_task

        return shard_task(task, ctx.device, ctx.world_size)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(task, device_ids=device_ids, broadcast_buffers=False)


def is_fsdp(model: nn.Module) -> bool:
    from t2i.train.sharding import is_sharded

    return is_sharded(model)


@contextlib.contextmanager
def full_params(model: nn.Module) -> Iterator[None]:
    """Unsharded parameters inside the block under FSDP (every rank must enter); a no-op otherwise."""
    if is_fsdp(model):
        from t2i.train.sharding import unsharded

        with unsharded(model):
            yield
    else:
        yield


def full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with full tensors: under FSDP a module's state_dict holds shards (DTensors), gathered here (every
    rank must call, in the same order); otherwise `state` itself."""
    if not is_fsdp(model):
        return state
    from t2i.train.sharding import full_value

    return {name: full_value(value) for name, value in state.items()}


def no_sync(model: nn.Module, skip_sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce (reduce-scatter under FSDP) on all but the last micro-batch of an
    accumulation window."""
    if not skip_sync:
        return contextlib.nullcontext()
    if is_fsdp(model):
        from t2i.train.sharding import gradient_sync

        return gradient_sync(model, enabled=False)
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


def clip_grad_norm(model: nn.Module, params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Global gradient norm before clipping (clips only when `max_norm` is a positive number); under FSDP the
    norm is over the whole sharded gradient (a collective)."""
    limit = float(max_norm) if max_norm else float("inf")
    norm = nn.utils.clip_grad_norm_(params, limit)
    if is_fsdp(model):
        from t2i.train.sharding import full_value

        return full_value(norm)
    return norm


def mean_across_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Average of a scalar over ranks (every rank must call it)."""
    if not ctx.is_distributed:
        return value
    value = value.detach().clone().to(ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / ctx.world_size


def gather_to_all(obj: Any, ctx: DistContext) -> list[Any]:
    """One object per rank, in rank order (every rank must call it)."""
    if not ctx.is_distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
