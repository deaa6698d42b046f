"""AdamW and the learning-rate schedule (a pure function of the step, so resuming needs only the step)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from t2i.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `params` with the configured lr, betas, eps, (decoupled) weight decay and implementation
    (`fused` / `foreach`; null leaves torch's choice)."""
    from t2i.errors import ConfigError

    params = list(params)
    if not params:
        raise ConfigError("model: the task has no trainable parameters (everything is frozen)")
    implementation = {k: v for k, v in (("fused", cfg.fused), ("foreach", cfg.foreach)) if v is not None}
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, **implementation)  # fmt: skip
    except (RuntimeError, ValueError) as err:  # e.g. fused AdamW on a device or dtype torch has no kernel for
        devices = sorted({str(p.device) for p in params})
        raise ConfigError(f"model.optim: {implementation} is not supported for parameters on {devices} ({err}); "
                          "expected fused / foreach null or false there") from None


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup over `sched.warmup_steps`, then
    constant `lr`, or cosine from `lr` down to `sched.min_lr` at `max_steps`."""
    sched = cfg.sched
    if step < sched.warmup_steps:
        return cfg.lr * (step + 1) / sched.warmup_steps
    if sched.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - sched.warmup_steps) / max(1, max_steps - sched.warmup_steps))
    return sched.min_lr + (cfg.lr - sched.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
