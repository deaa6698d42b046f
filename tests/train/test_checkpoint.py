"""Checkpoints: atomic (complete or absent), pruned, inert (weights_only), RNG round trip, resume lookup."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from train_toy import ToyTask, toy_config

from t2i.errors import ConfigError
from t2i.train import checkpoint as ckpt_io
from t2i.train.trainer import train


def _save(out_dir, step, keep_last=None):
    model = {"w": torch.full((2, 3), float(step)), "b": torch.arange(3)}
    state = {"step": step, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}}
    return ckpt_io.save_checkpoint(out_dir, step, model, {"w": model["w"] * 2, "b": model["b"]}, state,
                                   "name: x\n", keep_last)


def test_save_writes_inert_files_and_prunes(tmp_path):
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, keep_last=2)
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["ckpt-000030", "ckpt-000040"]
    latest = ckpt_io.latest_checkpoint(tmp_path)
    assert sorted(p.name for p in latest.iterdir()) == ["complete.json", "config.yaml", "ema.safetensors",
                                                        "model.safetensors", "state.pt"]
    state = torch.load(latest / "state.pt", weights_only=True)  # raises if anything needs unpickling code
    assert state["step"] == 40 and state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert torch.equal(ckpt_io.load_weights(latest, use_ema=True)["w"], torch.full((2, 3), 80.0))
    assert torch.equal(ckpt_io.load_weights(latest, use_ema=False)["w"], torch.full((2, 3), 40.0))
    assert not list(tmp_path.glob("*.tmp"))


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 3)
    calls = {"n": 0}
    real_write = ckpt_io.write_safetensors

    def failing_write(handle, tensors):
        calls["n"] += 1
        if calls["n"] == 2:  # model.safetensors written, then the EMA write dies
            raise OSError("disk failure (simulated)")
        return real_write(handle, tensors)

    monkeypatch.setattr(ckpt_io, "write_safetensors", failing_write)
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, 6)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000003"]  # no half-written ckpt-000006(.tmp)
    assert ckpt_io.latest_checkpoint(tmp_path).name == "ckpt-000003"
    assert ckpt_io.load_train_state(tmp_path / "ckpt-000003")["step"] == 3
    assert torch.equal(ckpt_io.load_weights(tmp_path / "ckpt-000003", use_ema=False)["w"], torch.full((2, 3), 3.0))


def test_leftover_tmp_dir_is_ignored_and_replaced(tmp_path):
    _save(tmp_path, 5)
    (tmp_path / "ckpt-000009.tmp").mkdir()  # a crash after mkdir: never picked for resume
    (tmp_path / "ckpt-000009.tmp" / "model.safetensors").write_bytes(b"junk")
    assert ckpt_io.latest_checkpoint(tmp_path).name == "ckpt-000005"
    _save(tmp_path, 9)
    assert ckpt_io.latest_checkpoint(tmp_path).name == "ckpt-000009"
    assert not (tmp_path / "ckpt-000009.tmp").exists()


def test_training_crash_in_save_then_resume_auto(tmp_path, monkeypatch):
    settings = {"max_steps": 6, "checkpoint_every": 3}
    full = train(toy_config(tmp_path / "full", **settings), ToyTask())
    real_save = ckpt_io.save_checkpoint

    def save_then_die(out_dir, step, *args, **kwargs):
        if step == 6:
            raise KeyboardInterrupt("killed while saving")
        return real_save(out_dir, step, *args, **kwargs)

    monkeypatch.setattr(ckpt_io, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(toy_config(tmp_path / "run", **settings), ToyTask())
    monkeypatch.setattr(ckpt_io, "save_checkpoint", real_save)
    resumed = train(toy_config(tmp_path / "run", resume="auto", **settings), ToyTask())
    assert resumed.losses == full.losses
    assert resumed.last_checkpoint.name == "ckpt-000006"


def test_rng_capture_restore_round_trip():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = ckpt_io.capture_rng(gen)
    first = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    torch.manual_seed(99), np.random.seed(99), random.seed(99), gen.manual_seed(99)
    ckpt_io.restore_rng(state, gen)
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2] and torch.equal(first[3], again[3])


def test_find_resume_checkpoint(tmp_path):
    assert ckpt_io.find_resume_checkpoint(None, tmp_path) is None
    assert ckpt_io.find_resume_checkpoint("auto", tmp_path) is None  # nothing yet: fresh start
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    assert ckpt_io.find_resume_checkpoint("auto", tmp_path).name == "ckpt-000002"
    assert ckpt_io.find_resume_checkpoint(str(tmp_path), tmp_path / "other").name == "ckpt-000002"
    assert ckpt_io.find_resume_checkpoint(str(tmp_path / "ckpt-000001"), tmp_path).name == "ckpt-000001"
    with pytest.raises(ConfigError, match="trainer.resume: .*nope"):
        ckpt_io.find_resume_checkpoint(str(tmp_path / "nope"), tmp_path)


def test_load_task_weights_prefers_ema(tmp_path):
    task = ToyTask()
    result = train(toy_config(tmp_path, max_steps=2, checkpoint_every=2, ema={"decay": 0.5}), task)
    fresh = ToyTask()
    ckpt_io.load_task_weights(fresh, result.last_checkpoint, use_ema=True)
    assert torch.equal(fresh.net[0].weight, task.ema.shadow["net.0.weight"])
    ckpt_io.load_task_weights(fresh, result.last_checkpoint, use_ema=False)
    assert torch.equal(fresh.net[0].weight, task.net[0].weight)
