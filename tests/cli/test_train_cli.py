"""`t2i train`: --print-config, one-line config errors, and a real (toy) run through the command."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from t2i.cli.main import main
from t2i.train import task as task_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_toy import ToyTask


def test_print_config_shows_resolved_yaml(capsys):
    assert main(["train", "sd15", "trainer.precision=bf16", "name=cli", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["precision"] == "bf16" and printed["trainer"]["out_dir"] == "runs/cli"
    assert printed["model"]["unet_config"]["context_dim"] == 768


def test_config_error_is_one_line_exit_2(capsys):
    assert main(["train", "sd15", "trainer.precision=fp8"]) == 2
    err = capsys.readouterr().err
    assert err == "t2i train: error: trainer.precision: 'fp8' is not one of 32, bf16, fp16\n"


def test_train_command_runs_registered_task(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(task_registry, "_TASKS", {"autoencoder": lambda cfg: ToyTask()})
    config = tmp_path / "toy.yaml"
    config.write_text("name: toy\nmodel: {kind: autoencoder}\ndata: {batch_size: 2}\n")
    rc = main(["train", str(config), f"trainer.out_dir={tmp_path / 'run'}", "trainer.max_steps=3",
               "trainer.checkpoint_every=2", "trainer.progress_bar=false", "trainer.log_every=1"])
    assert rc == 0
    assert "last checkpoint" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt-*")) == ["ckpt-000002", "ckpt-000003"]
