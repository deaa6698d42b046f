"""kill -9 at three points of a run (mid-step, mid-save, mid-prune), each followed by `resume=auto`: the result is
bit-identical to an uninterrupted run and the run folder holds no stale or half-deleted checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("toy_run.py")
SRC = Path(__file__).resolve().parents[2] / "src"
SETTINGS = ["--steps", "12", "--checkpoint-every", "2", "--keep-last", "2"]
CHECKPOINT_FILES = {"model.safetensors", "ema.safetensors", "state.pt", "config.yaml"}


def toy_run(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("TORCHELASTIC_RUN_ID", None)
    return subprocess.run([sys.executable, str(SCRIPT), str(out), *SETTINGS, *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.silent
@pytest.mark.timeout(180)
def test_three_kills_then_resume_is_bit_identical_and_leaves_no_debris(tmp_path, single_thread):
    from toy_run import Task, run_config

    from t2i.train.trainer import train

    reference = tmp_path / "reference"
    reference.mkdir()
    expected = train(run_config(reference, 12, 2, 2, resume=False), Task(reference, None, 0.0))
    run = tmp_path / "run"
    for kill in (["--kill-at-call", "5"], ["--resume", "--kill-in-save", "8"], ["--resume", "--kill-in-prune", "10"]):
        killed = toy_run(run, *kill)
        assert killed.returncode == -signal.SIGKILL, (kill, killed.stderr[-3000:])
    final = toy_run(run, "--resume")
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resumed from" in final.stdout and "ckpt-000010" in final.stdout

    got = json.loads((run / "result-0.json").read_text())
    assert got == {"step": 12, "losses": expected.losses}  # every loss of steps 1..12, bit for bit
    for name in ("model.safetensors", "ema.safetensors"):
        want, have = load_file(reference / "ckpt-000012" / name), load_file(run / "ckpt-000012" / name)
        assert want.keys() == have.keys() and all((want[k] == have[k]).all() for k in want), name

    checkpoints = sorted(p.name for p in run.iterdir() if p.name.startswith("ckpt-"))
    assert checkpoints == ["ckpt-000010", "ckpt-000012"], sorted(p.name for p in run.iterdir())
    for name in checkpoints:
        assert CHECKPOINT_FILES <= {p.name for p in (run / name).iterdir()}, name
    debris = [p.name for p in run.iterdir() if p.name.startswith(".") or p.name.endswith((".tmp", ".old"))]
    assert debris == []
