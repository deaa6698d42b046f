"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for `trainer.strategy: fsdp`, per block of the backbone.

Which modules are sharded (`shard_plan`): going down from the task through the modules that hold trainable
parameters, every backbone that names its blocks (`blocks()`, the backbone contract: the Flux transformer's
double and single blocks) or keeps them in `nn.ModuleList`s (the UNet's input and output blocks) is sharded
block by block and then as a whole; a leaf module with
trainable parameters is sharded on its own. Frozen parts (VAE, text encoders) stay whole on every rank: their
forward runs outside the sharded modules, and they take no gradients. Every trainable parameter must land in a
sharded module, or its gradients would silently stay unsynchronised: `shard_task` checks that.

Each sharded module all-gathers its parameters in its forward and frees them after (and again in backward), and
its gradients are reduce-scattered, averaged over ranks, as DDP averages them. Activation checkpointing is the
model's own option (`use_checkpoint` in the backbone config).

`unsharded` holds every sharded module's full parameters for a block of code (EMA updates, previews, checkpoints:
the code inside sees plain full tensors; what it writes to them is dropped when the block ends, so the weights
must be restored by then, as `ema_weights` does). Optimizer state is saved and restored as one full state dict
through `torch.distributed.checkpoint.state_dict`, so checkpoints are the same files as without FSDP and resume
exactly with any strategy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

SHARDED = "_t2i_sharded_modules"


def has_trainable(module: nn.Module, recurse: bool = True) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=recurse))


def shard_plan(task: nn.Module) -> list[nn.Module]:
    """The modules to `fully_shard`, inner before outer (see the module docstring)."""
    plan: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if callable(getattr(module, "blocks", None)):
            blocks = list(module.blocks())
        else:
            blocks = [b for child in module.children() if isinstance(child, nn.ModuleList) for b in child]
        if blocks:
            plan.extend(block for block in blocks if has_trainable(block))
            plan.append(module)
            return
        children = [child for child in module.children() if has_trainable(child)]
        for child in children:
            visit(child)
        if not children or has_trainable(module, recurse=False):
            plan.append(module)

    for child in task.children():
        if has_trainable(child):
            visit(child)
    return plan


def shard_task(task: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """`fully_shard` the modules of `shard_plan(task)` over all ranks; returns the task itself (sharded in place).

    Raises ConfigError if a trainable parameter is left outside every sharded module."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh(device.type, (world_size,))
    plan = shard_plan(task)
    for module in plan:
        fully_shard(module, mesh=mesh)
    task.__dict__[SHARDED] = plan  # not registered as submodules: they already are, where they live
    left = [name for name, p in task.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if left:
        from t2i.errors import ConfigError

        raise ConfigError(f"trainer.strategy: fsdp left trainable parameters unsharded ({', '.join(left[:3])}); "
                          "their gradients would not be synchronised; use ddp for this task")  # fmt: skip
    return task


def sharded_modules(model: nn.Module) -> list[nn.Module]:
    """The modules `shard_task` sharded (looked up, not searched for: the loop asks several times a step)."""
    return model.__dict__.get(SHARDED, [])


def is_sharded(model: nn.Module) -> bool:
    return bool(sharded_modules(model))


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Full parameters in every sharded module for the block, kept across forwards (every rank must enter)."""
    modules = sharded_modules(model)
    for module in modules:
        module.set_reshard_after_forward(False)
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(True)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the reduce-scatter of gradients inside the block when not `enabled` (gradient accumulation)."""
    modules = sharded_modules(model)
    for module in modules:
        module.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        for module in modules:
            module.set_requires_gradient_sync(True)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective), any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state with full tensors keyed by parameter name (every rank must call; rank 0 gets it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load what `full_optimizer_state` returned into the sharded optimizer (every rank, from the same file)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
