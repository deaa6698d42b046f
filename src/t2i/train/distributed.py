"""Multi-process training through torch.distributed only: `torchrun --nproc_per_node N -m t2i.cli.main train ...`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them the run is a single
process and every helper here is a no-op. Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
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
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
        owns = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


def cleanup_distributed(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()


def wrap_model(task: nn.Module, ctx: DistContext, strategy: str) -> nn.Module:
    """DDP (or FSDP) around the task; the loop calls the wrapper, so gradients are synchronised in backward.

    Frozen parameters (requires_grad False) are not synchronised by DDP. FSDP flattens parameters with
    `use_orig_params=True` so frozen and trainable weights may share a shard unit.
    """
    if not dist.is_initialized():
        return task
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    if strategy == "fsdp":
        if ctx.device.type != "cuda":
            from t2i.errors import ConfigError

            raise ConfigError("trainer.strategy: 'fsdp' needs CUDA devices (FSDP has no CPU backend); use ddp")
        import functools

        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

        policy = functools.partial(size_based_auto_wrap_policy, min_num_params=20_000_000)
        return FullyShardedDataParallel(task, auto_wrap_policy=policy, use_orig_params=True,
                                        device_id=ctx.device, sync_module_states=True)
    return nn.parallel.DistributedDataParallel(task, device_ids=device_ids, broadcast_buffers=False)


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


@contextlib.contextmanager
def full_params(model: nn.Module) -> Iterator[None]:
    """Unsharded parameters inside the block under FSDP (every rank must enter); a no-op otherwise."""
    if is_fsdp(model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            yield
    else:
        yield


def no_sync(model: nn.Module, skip_sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation window."""
    if skip_sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(model: nn.Module, params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Global gradient norm before clipping (clips only when `max_norm` is a positive number)."""
    limit = float(max_norm) if max_norm else float("inf")
    if is_fsdp(model):
        return model.clip_grad_norm_(limit)
    return nn.utils.clip_grad_norm_(params, limit)


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
