"""The one training loop for every model family (nanoGPT style: explicit, top to bottom, no callbacks).

    task = build_task(cfg)                   # DiffusionTask: data, trainable params, loss, samples
    for step in range(start, max_steps):
        lr = lr_at(step); zero grads
        for each of grad_accum micro-batches:  loss = task(batch, generator) / grad_accum; backward
        unscale, clip, optimizer step (GradScaler under fp16); EMA update
        every log_every: console + TensorBoard + loss.png; every sample_every: sample grid (EMA weights);
        every eval_every: the held-out judge (+ judge FID) -> TensorBoard + eval.png
        every checkpoint_every (and at the end): atomic checkpoint

Precision: `32` (no autocast), `bf16` (autocast to bfloat16), `fp16` (autocast to float16 + GradScaler).
Weights, optimizer state and EMA stay float32 in all three. CPU autocast supports both bf16 and fp16 in the
torch versions we support, so no fallback is needed there (fp16 on CPU is slow, but correct).

Resume is exact: the checkpoint restores weights, EMA, optimizer, grad scaler, the step, every RNG (torch,
CUDA, numpy, python, the task's generator) of every rank and the data position, so a resumed run produces the
same losses as an uninterrupted one (bit-exact on CPU). The LR schedule is a pure function of the step.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from t2i.atomic import atomic_write
from t2i.config import RunConfig, to_yaml
from t2i.errors import DataError
from t2i.train import checkpoint as ckpt_io
from t2i.train.distributed import (
    DistContext,
    barrier,
    check_strategy,
    cleanup_distributed,
    clip_grad_norm,
    full_params,
    full_state,
    gather_to_all,
    init_distributed,
    is_fsdp,
    mean_across_ranks,
    no_sync,
    wrap_model,
)
from t2i.train.ema import EMA
from t2i.train.logging import RunLogger
from t2i.train.optim import build_optimizer, lr_at, set_lr
from t2i.train.runlock import acquire_run_lock
from t2i.train.task import DiffusionTask, build_task, seed_everything

log = logging.getLogger("t2i.train")


@dataclass
class TrainResult:
    """What a finished (or already complete) run reports."""

    step: int
    losses: list[float]  # this rank's loss per optimizer step (micro-batch mean), from step 1, incl. before resume
    out_dir: Path
    last_checkpoint: Path | None = None


@dataclass
class LoopState:
    """Counters that a checkpoint must carry besides weights and optimizer."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    pending: list[torch.Tensor] = field(default_factory=list)  # per-step losses not yet copied to the host

    def flush(self) -> None:
        """Move pending loss tensors to `losses` (one device sync per flush instead of one per step)."""
        if self.pending:
            self.losses.extend(torch.stack(self.pending).float().cpu().tolist())
            self.pending.clear()


class Precision:
    """Autocast context and gradient scaling for `trainer.precision`."""

    def __init__(self, precision: str, device: torch.device):
        self.device_type = device.type
        self.dtype = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, model: nn.Module, params: list[nn.Parameter],
             grad_clip: float | None) -> torch.Tensor:
        """Unscale, clip, step (skipped by the scaler on inf/nan under fp16); returns the pre-clip grad norm."""
        self.scaler.unscale_(optimizer)
        grad_norm = clip_grad_norm(model, params, grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        return grad_norm


class BatchStream:
    """Endless batches from a task's dataloader: re-iterates at the end of an epoch, counts what it served."""

    def __init__(self, loader: Any, consumed: int = 0):
        self.loader = loader
        self.consumed = consumed
        self._iterator: Any = None

    def start(self) -> None:
        if self._iterator is None:
            self._iterator = iter(self.loader)

    def next(self) -> dict[str, Any]:
        self.start()
        try:
            batch = self._next()
        except StopIteration:
            self._iterator = iter(self.loader)
            try:
                batch = self._next()
            except StopIteration:
                raise DataError("data.train: the dataloader yielded no batches (empty or fully skipped data)") from None
        self.consumed += 1
        return batch

    def _next(self) -> dict[str, Any]:
        try:
            return next(self._iterator)
        except StopIteration:
            raise
        except Exception as err:
            # Stop DataLoader workers now: left to the garbage collector (the traceback holds the iterator)
            # their shutdown waits 5 s per worker.
            if hasattr(self._iterator, "close"):
                self._iterator.close()
            self._iterator = None
            traceback.clear_frames(err.__traceback__)
            raise

    def skip(self, count: int) -> None:
        for _ in range(count):
            self.next()


def train(cfg: RunConfig, task: DiffusionTask | None = None) -> TrainResult:
    """Train `task` (default: `build_task(cfg)`) as configured; works alone or under torchrun.

    Rank 0 holds the run folder's lock (`t2i.train.runlock`) for the whole run, so a second job on the same
    `trainer.out_dir` fails at once with `RunFolderBusyError`, and sweeps what a killed run left there.
    """
    ctx = init_distributed()
    lock = None
    try:
        check_strategy(cfg.trainer.strategy, ctx)
        if ctx.is_main:
            lock = acquire_run_lock(cfg.trainer.out_dir)
            swept = ckpt_io.sweep_run_folder(cfg.trainer.out_dir)
            if swept:
                log.warning("%s: removed leftovers of an interrupted run: %s", cfg.trainer.out_dir, ", ".join(swept))
        barrier(ctx)  # no rank looks at the folder before it is locked and swept
        return _train(cfg, task, ctx)
    finally:
        if lock is not None:
            lock.release()
        cleanup_distributed(ctx)


def _train(cfg: RunConfig, task: DiffusionTask | None, ctx: DistContext) -> TrainResult:
    tcfg, out_dir = cfg.trainer, Path(cfg.trainer.out_dir)
    seed_everything(cfg.seed)  # same state on every rank; per-rank streams are re-seeded below
    task = task if task is not None else build_task(cfg)
    task.prepare_for_training(cfg, ctx.device)
    task.train()
    resume_from = ckpt_io.find_resume_checkpoint(tcfg.resume, out_dir, report=ctx.is_main)
    saved = _load_resume_state(resume_from, task)
    model = wrap_model(task, ctx, tcfg.strategy)
    params = task.trainable_parameters()
    optimizer = build_optimizer(params, cfg.model.optim)
    precision = Precision(tcfg.precision, ctx.device)
    task.ema = _build_ema(cfg, model, task, resume_from)
    seed_everything(cfg.seed + ctx.rank)
    generator = torch.Generator(device=ctx.device).manual_seed(cfg.seed + ctx.rank)
    loader = task.build_dataloader(cfg, ctx.rank, ctx.world_size)
    state, batches = LoopState(), BatchStream(loader)
    if saved is not None:
        _restore_optimizer(saved, model, optimizer, precision)
        state = _restore_loop(saved, ctx, loader, batches, generator, resume_from)
    else:
        batches.start()
        _warn_if_unresumed_checkpoints(tcfg.resume, out_dir, ctx)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        config = to_yaml(cfg).encode("utf-8")
        atomic_write(out_dir / "config.yaml", lambda f: f.write(config), needed=len(config))
    return _loop(cfg, ctx, task, model, params, optimizer, precision, generator, batches, state)


def _loop(cfg: RunConfig, ctx: DistContext, task: DiffusionTask, model: nn.Module, params: list[nn.Parameter],
          optimizer: torch.optim.Optimizer, precision: Precision, generator: torch.Generator,
          batches: BatchStream, state: LoopState) -> TrainResult:
    tcfg, out_dir = cfg.trainer, Path(cfg.trainer.out_dir)
    show_bar = ctx.is_main and tcfg.progress_bar
    progress = tqdm(total=tcfg.max_steps, initial=state.step, desc="train", dynamic_ncols=True, disable=not show_bar)
    logger = RunLogger(out_dir, enabled=ctx.is_main, progress=progress if show_bar else None)
    evaluator = _build_evaluator(cfg, ctx)
    last_ckpt, window = None, _Window()
    try:
        while state.step < tcfg.max_steps:
            lr = lr_at(state.step, cfg.model.optim, tcfg.max_steps)
            set_lr(optimizer, lr)
            optimizer.zero_grad(set_to_none=True)
            loss, images = _accumulate(model, batches, generator, precision, tcfg.grad_accum)
            grad_norm = precision.step(optimizer, model, params, tcfg.grad_clip)
            state.step += 1
            if task.ema is not None:
                with full_params(model):
                    task.ema.update(full_state(model, task.model_state_dict()), state.step)
            state.pending.append(loss)
            window.add(loss, images)
            progress.update(1)
            if _due(state.step, tcfg.log_every, tcfg.max_steps):
                _log(logger, ctx, task, state, window, lr, grad_norm, progress)
            if tcfg.sample_prompts and _due(state.step, tcfg.sample_every, None):
                _sample(cfg, ctx, task, model, logger, state.step)
            if _due(state.step, tcfg.eval_every, tcfg.max_steps):
                _evaluate(cfg, ctx, task, model, logger, evaluator, state.step)
            if _due(state.step, tcfg.checkpoint_every, tcfg.max_steps):
                last_ckpt = _save(cfg, ctx, task, model, optimizer, precision, generator, batches, state)
    finally:
        progress.close()
        state.flush()
        logger.loss_curve(range(1, len(state.losses) + 1), state.losses)
        logger.close()
    last_ckpt = last_ckpt or (ckpt_io.latest_checkpoint(out_dir) if ctx.is_main else None)
    return TrainResult(state.step, state.losses, out_dir, last_ckpt)


def _due(step: int, every: int, last: int | None) -> bool:
    """True every `every` steps (0 = never) and at step `last`."""
    return bool(every) and (step % every == 0 or step == last)


def _accumulate(model: nn.Module, batches: BatchStream, generator: torch.Generator, precision: Precision,
                grad_accum: int) -> tuple[torch.Tensor, int]:
    """Forward/backward over `grad_accum` micro-batches; returns (mean loss, images seen) of this rank."""
    total, images = torch.zeros((), device=generator.device), 0
    for micro in range(grad_accum):
        batch = batches.next()
        with no_sync(model, skip_sync=micro < grad_accum - 1):
            with precision.autocast():
                loss = model(batch, generator)
            precision.backward(loss / grad_accum)
        total = total + loss.detach().float()
        images += _batch_size(batch)
    return total / grad_accum, images


def _batch_size(batch: dict[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
        if isinstance(value, (list, tuple)):
            return len(value)
    return 0


class _Window:
    """Losses and throughput since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.images = 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.losses.append(loss)
        self.images += images


def _log(logger: RunLogger, ctx: DistContext, task: DiffusionTask, state: LoopState, window: _Window, lr: float,
         grad_norm: torch.Tensor, progress: Any) -> None:
    """Every rank reduces the window's loss; rank 0 writes console, TensorBoard and loss.png."""
    loss = mean_across_ranks(torch.stack(window.losses).mean(), ctx).item()
    elapsed = max(time.perf_counter() - window.started, 1e-9)
    values = {"train/loss": loss, "train/lr": lr, "train/grad_norm": float(grad_norm),
              "train/images_per_s": window.images * ctx.world_size / elapsed}
    values.update({f"data/{k}": float(v) for k, v in task.data_stats().items()})
    state.flush()
    logger.scalars(state.step, values)
    logger.loss_curve(range(1, len(state.losses) + 1), state.losses)
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
    window.reset()


def _sample(cfg: RunConfig, ctx: DistContext, task: DiffusionTask, model: nn.Module, logger: RunLogger,
            step: int) -> None:
    """Sample grid with the EMA weights on rank 0 (all ranks take part under FSDP, which must unshard)."""
    if not (ctx.is_main or is_fsdp(model)):
        return
    task.eval()
    try:
        with full_params(model), task.ema_weights(True), torch.no_grad():
            images = task.sample_images(list(cfg.trainer.sample_prompts), cfg.seed)
    finally:
        task.train()
    path = logger.samples(step, images, list(cfg.trainer.sample_prompts))
    if path is not None:
        logger.print(f"step {step}: samples -> {path}")


def _build_evaluator(cfg: RunConfig, ctx: DistContext) -> Any:
    """The `trainer.eval_every` evaluator (built once, on rank 0), or None when evaluation is off."""
    if not cfg.trainer.eval_every or not ctx.is_main:
        return None
    from t2i.metrics.training import shapes_evaluator

    e = cfg.trainer.eval
    return shapes_evaluator(cfg.trainer.out_dir, cfg.data.resolution, split=e.split, seeds=e.seeds, fid=e.fid,
                            reference_per_prompt=e.reference_per_prompt, task=e.task)  # fmt: skip


def _evaluate(cfg: RunConfig, ctx: DistContext, task: DiffusionTask, model: nn.Module, logger: RunLogger,
              evaluator: Any, step: int) -> None:
    """Score samples of the evaluation prompts with the EMA weights on rank 0 (every rank unshards under FSDP)."""
    if not (ctx.is_main or is_fsdp(model)):
        return
    task.eval()
    try:
        with full_params(model), task.ema_weights(True), torch.no_grad():
            scores = evaluator(step, task.sample_images, writer=logger.writer) if evaluator is not None else {}
    finally:
        task.train()
    if scores:
        logger.print(f"step {step}: " + " ".join(f"{k}={v:.3f}" for k, v in scores.items()))


def _build_ema(cfg: RunConfig, model: nn.Module, task: DiffusionTask, resume_from: Path | None) -> EMA | None:
    ema_cfg = cfg.trainer.ema
    if not ema_cfg.enabled:
        return None
    with full_params(model):
        ema = EMA(full_state(model, task.model_state_dict()), ema_cfg.decay, ema_cfg.start_step, ema_cfg.warmup, ema_cfg.device,
                  ema_cfg.update_every)
    if resume_from is not None and (resume_from / ckpt_io.EMA_FILE).is_file():
        ema.load_state_dict(ckpt_io.load_weights(resume_from, use_ema=True))
    return ema


# ----------------------------------------------------------------------------------------------- save / resume


def _save(cfg: RunConfig, ctx: DistContext, task: DiffusionTask, model: nn.Module,
          optimizer: torch.optim.Optimizer, precision: Precision, generator: torch.Generator,
          batches: BatchStream, state: LoopState) -> Path | None:
    """Collect every rank's RNG + data position, then rank 0 writes the checkpoint (barriers around it)."""
    state.flush()
    ranks = gather_to_all(_rank_state(generator, batches), ctx)
    with full_params(model):
        model_state = {k: v.detach().cpu().clone() for k, v in full_state(model, task.model_state_dict()).items()}
    optim_state = _optimizer_state(model, optimizer)
    barrier(ctx)
    path = None
    if ctx.is_main:
        train_state = {
            "version": 1,
            "step": state.step,
            "world_size": ctx.world_size,
            "optimizer": optim_state,
            "scaler": precision.scaler.state_dict(),
            "ranks": ranks,
            "losses": torch.tensor(state.losses, dtype=torch.float64),
        }
        ema_state = task.ema.state_dict() if task.ema is not None else None
        path = ckpt_io.save_checkpoint(cfg.trainer.out_dir, state.step, model_state, ema_state, train_state,
                                       to_yaml(cfg), cfg.trainer.keep_last)
    barrier(ctx)
    return path


def _rank_state(generator: torch.Generator, batches: BatchStream) -> dict[str, Any]:
    data_source = _stateful(batches.loader)
    return {
        "rng": ckpt_io.capture_rng(generator),
        "batches_consumed": batches.consumed,
        "data": data_source.state_dict() if data_source is not None else None,
    }


def _stateful(loader: Any) -> Any:
    """The loader (or its `.dataset`) if it can save and restore its position, else None."""
    for candidate in (loader, getattr(loader, "dataset", None)):
        if candidate is not None and hasattr(candidate, "state_dict") and hasattr(candidate, "load_state_dict"):
            return candidate
    return None


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state: by parameter index, or under FSDP full and by parameter name."""
    if is_fsdp(model):
        from t2i.train.sharding import full_optimizer_state

        return full_optimizer_state(model, optimizer)
    return optimizer.state_dict()


def _load_resume_state(resume_from: Path | None, task: DiffusionTask) -> dict[str, Any] | None:
    """Read state.pt and load the live weights into the (still unwrapped) task."""
    if resume_from is None:
        return None
    saved = ckpt_io.load_train_state(resume_from)
    task.load_model_state_dict(ckpt_io.load_weights(resume_from, use_ema=False))
    return saved


def _restore_optimizer(saved: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                       precision: Precision) -> None:
    optim_state = saved["optimizer"]
    by_name = any(isinstance(key, str) for key in optim_state.get("state", {}))
    if by_name != is_fsdp(model) and optim_state.get("state"):
        from t2i.errors import CheckpointError

        saved_with, now = ("fsdp", "ddp") if by_name else ("ddp", "fsdp")
        raise CheckpointError(f"trainer.strategy: the checkpoint's optimizer state was saved with {saved_with}; "
                              f"resume it with trainer.strategy={saved_with} (this run uses {now})")  # fmt: skip
    if is_fsdp(model):
        from t2i.train.sharding import load_full_optimizer_state

        load_full_optimizer_state(model, optimizer, optim_state)
    else:
        optimizer.load_state_dict(optim_state)
    precision.scaler.load_state_dict(saved["scaler"])


def _restore_loop(saved: dict[str, Any], ctx: DistContext, loader: Any, batches: BatchStream,
                  generator: torch.Generator, resume_from: Path) -> LoopState:
    """Data position first (it may draw random numbers when iteration starts), RNG states last."""
    if saved["world_size"] != ctx.world_size:
        warnings.warn(f"{resume_from}: saved with {saved['world_size']} processes, resuming with "
                      f"{ctx.world_size}; data order and random streams will differ", stacklevel=3)
        mine = None
    else:
        mine = saved["ranks"][ctx.rank]
    data_source = _stateful(loader)
    if mine is not None and mine["data"] is not None and data_source is not None:
        data_source.load_state_dict(mine["data"])
        batches.consumed = mine["batches_consumed"]
        batches.start()
    else:
        batches.start()
        batches.skip(mine["batches_consumed"] if mine is not None else 0)
    if mine is not None:
        ckpt_io.restore_rng(mine["rng"], generator)
    if ctx.is_main:
        print(f"resumed from {resume_from} at step {saved['step']}", flush=True)
    return LoopState(step=int(saved["step"]), losses=[float(v) for v in saved["losses"].tolist()])


def _warn_if_unresumed_checkpoints(resume: str | None, out_dir: Path, ctx: DistContext) -> None:
    if resume is None and ctx.is_main and ckpt_io.list_checkpoints(out_dir):
        warnings.warn(f"{out_dir} already holds checkpoints; starting from step 0 "
                      "(set trainer.resume=auto to continue that run)", stacklevel=3)
