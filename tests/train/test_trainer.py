"""The generic loop on a toy MLP task: learning, exact resume, accumulation, precision, EMA, LR, logs."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_toy import ToyTask, toy_config

from t2i.config import OptimConfig, SchedConfig
from t2i.errors import ConfigError
from t2i.train import task as task_registry
from t2i.train.ema import EMA
from t2i.train.optim import lr_at
from t2i.train.trainer import train


def _weights(task: ToyTask) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in task.model_state_dict().items()}


def test_training_reduces_loss_and_writes_logs(tmp_path):
    cfg = toy_config(tmp_path, max_steps=60, log_every=10, sample_every=30, sample_prompts=["a", "b", "c"],
                     checkpoint_every=30, optim={"lr": 2e-2})
    task = ToyTask()
    frozen_before = task.frozen.weight.detach().clone()
    result = train(cfg, task)
    assert result.step == 60 and len(result.losses) == 60
    assert sum(result.losses[-10:]) / 10 < 0.8 * sum(result.losses[:10]) / 10
    assert torch.equal(task.frozen.weight, frozen_before)  # frozen layers are not optimised
    assert (tmp_path / "config.yaml").read_text().startswith("name: toy")
    assert Image.open(tmp_path / "loss.png").size == (640, 360)
    grid = Image.open(tmp_path / "samples" / "step_000060.png")
    assert grid.width >= 3 * 16
    scalars = _tensorboard_scalars(tmp_path / "tb")
    assert scalars["train/loss"][-1][0] == 60 and len(scalars["train/loss"]) == 6
    assert scalars["train/lr"][0][1] == pytest.approx(2e-2)
    assert "train/images_per_s" in scalars and "data/skipped" in scalars
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000030", "ckpt-000060"]


def _tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


RESUME_SETTINGS = {"max_steps": 8, "checkpoint_every": 4, "keep_last": 5, "grad_accum": 2, "grad_clip": 0.5,
                   "optim": {"sched": {"warmup_steps": 3, "schedule": "cosine", "min_lr": 1e-4}}}


def test_resume_from_checkpoint_continues_bit_exact(tmp_path):
    full_task = ToyTask(dropout=0.2, num_batches=5)  # 5-batch epochs: the data wraps around mid-run
    full = train(toy_config(tmp_path / "full", **RESUME_SETTINGS), full_task)
    resumed_task = ToyTask(dropout=0.2, num_batches=5)
    cfg = toy_config(tmp_path / "resumed", resume=str(tmp_path / "full" / "ckpt-000004"), **RESUME_SETTINGS)
    resumed = train(cfg, resumed_task)
    assert resumed.losses == full.losses  # history up to step 4 comes from the checkpoint, 5..8 are recomputed
    assert _weights(resumed_task).keys() == _weights(full_task).keys()
    for key, value in _weights(full_task).items():
        assert torch.equal(_weights(resumed_task)[key], value), key
    for key, value in full_task.ema.shadow.items():
        assert torch.equal(resumed_task.ema.shadow[key], value), key


@pytest.mark.parametrize("stateful_data", [False, True])
def test_killed_run_resumes_with_auto(tmp_path, stateful_data):
    settings = {**RESUME_SETTINGS, "checkpoint_every": 3}
    full = train(toy_config(tmp_path / "full", **settings), ToyTask(num_batches=5, stateful_data=stateful_data))
    run_dir = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):  # dies in step 5 (micro-batch 9 of 16), after ckpt-000003
        train(toy_config(run_dir, **settings), ToyTask(num_batches=5, stateful_data=stateful_data, fail_at_call=9))
    assert sorted(p.name for p in run_dir.glob("ckpt-*")) == ["ckpt-000003"]
    task = ToyTask(num_batches=5, stateful_data=stateful_data)
    resumed = train(toy_config(run_dir, resume="auto", **settings), task)
    assert resumed.losses == full.losses
    state = torch.load(run_dir / "ckpt-000008" / "state.pt", weights_only=True)
    assert (state["ranks"][0]["data"] is not None) == stateful_data
    ema = load_file(run_dir / "ckpt-000008" / "ema.safetensors")
    assert torch.equal(ema["net.0.weight"], task.ema.shadow["net.0.weight"])


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    big = ToyTask(noise_from_batch=True)
    train(toy_config(tmp_path / "a", max_steps=1, batch_size=4, grad_accum=1), big)
    small = ToyTask(noise_from_batch=True)
    # two micro-batches of 2 read global samples 0-1 then 2-3: the same 4 vectors as one batch of 4
    train(toy_config(tmp_path / "b", max_steps=1, batch_size=2, grad_accum=2), small)
    for (name, p_big), p_small in zip(big.named_parameters(), small.parameters()):
        if p_big.requires_grad:
            torch.testing.assert_close(p_small.grad, p_big.grad, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(tmp_path, precision):
    result = train(toy_config(tmp_path, max_steps=6, precision=precision, checkpoint_every=6), ToyTask())
    assert all(math.isfinite(v) for v in result.losses)
    full32 = train(toy_config(tmp_path / "fp32", max_steps=6), ToyTask())
    assert result.losses[0] == pytest.approx(full32.losses[0], rel=0.05)  # autocast changes rounding only
    scaler = torch.load(tmp_path / "ckpt-000006" / "state.pt", weights_only=True)["scaler"]
    assert (scaler.get("scale") is not None) == (precision == "fp16")


def test_grad_clip_bounds_the_update(tmp_path):
    task = ToyTask()
    train(toy_config(tmp_path, max_steps=1, grad_clip=1e-3, ema={"enabled": False}), task)
    norm = torch.cat([p.grad.flatten() for p in task.trainable_parameters()]).norm()
    assert norm == pytest.approx(1e-3, rel=1e-4)


def test_ema_matches_closed_form():
    live = {"w": torch.zeros(3), "count": torch.tensor(0)}
    ema = EMA({"w": torch.ones(3), "count": torch.tensor(0)}, decay=0.9, start_step=2, warmup=False)
    for step in range(1, 3):  # until start_step the shadow tracks the live weights
        live["w"] = torch.full((3,), float(step))
        ema.update(live, step)
    assert torch.equal(ema.shadow["w"], torch.full((3,), 2.0))
    live = {"w": torch.full((3,), 5.0), "count": torch.tensor(7)}
    for step in range(3, 13):
        ema.update(live, step)
    expected = 5.0 + (2.0 - 5.0) * 0.9**10
    torch.testing.assert_close(ema.shadow["w"], torch.full((3,), expected), atol=1e-6, rtol=0)
    assert ema.shadow["count"].item() == 7


def test_ema_warmup_follows_diffusers_schedule_and_forgets_the_initialisation():
    ema = EMA({"w": torch.zeros(1)}, decay=0.995, start_step=3)
    assert [ema.decay_at(s) for s in (4, 5, 13)] == [2 / 11, 3 / 12, 11 / 20]
    assert ema.decay_at(10_000) == 0.995
    shadow, live = 0.0, 1.0
    for step in range(4, 504):  # closed form of the warmed-up average, step by step
        d = min(0.995, (1 + step - 3) / (10 + step - 3))
        shadow = d * shadow + (1 - d) * live
        ema.update({"w": torch.ones(1)}, step)
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([shadow]))
    assert 1 - shadow < 0.995**500 / 10  # far less of the initial weights than without warmup (~8%)


def test_ema_weights_are_used_for_sampling_then_restored(tmp_path):
    task = ToyTask()
    train(toy_config(tmp_path, max_steps=3, ema={"decay": 0.5}), task)
    live = _weights(task)
    with task.ema_weights(True):
        assert torch.equal(task.net[0].weight, task.ema.shadow["net.0.weight"])
        assert not torch.equal(task.net[0].weight, live["net.0.weight"])
    assert torch.equal(task.net[0].weight, live["net.0.weight"])


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, sched=SchedConfig(warmup_steps=4, schedule="cosine", min_lr=0.1))
    assert [lr_at(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, cfg, 14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, cfg, 14) == pytest.approx(0.1)
    constant = OptimConfig(lr=0.3)
    assert lr_at(0, constant, 10) == lr_at(9, constant, 10) == 0.3


def test_build_task_registry(monkeypatch):
    cfg = toy_config(".")
    monkeypatch.setitem(task_registry.TASK_MODULES, "autoencoder", "t2i.train.tasks.not_there")
    monkeypatch.setattr(task_registry, "_TASKS", {})
    with pytest.raises(ConfigError, match="model.kind: no training task registered for 'autoencoder'"):
        task_registry.build_task(cfg)
    task_registry.register_task("autoencoder")(lambda c: ToyTask())
    assert isinstance(task_registry.build_task(cfg), ToyTask)
