"""`t2i demo --quick`: every phase runs end to end and leaves its artefacts (accuracy is meaningless here)."""

from __future__ import annotations

import json

from t2i.cli.main import main


def test_quick_demo_runs_all_phases(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--threads", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["seconds"]) == ["data", "vae", "precache", "unet", "eval"]
    accuracy = results["accuracy"]
    assert accuracy["n"] == 22  # one sample per held-out combination
    assert all(0.0 <= accuracy[k] <= 1.0 for k in ("colour", "shape", "position", "all"))
    assert (out / "grid.png").stat().st_size > 0
    assert (out / "vae" / "export" / "config.json").is_file()
    assert json.loads((out / "latents" / "stats.json").read_text())["num_samples"] == 32
    assert (out / "pipeline" / "model_index.json").is_file() and (out / "pipeline" / "t2i.yaml").is_file()
    assert "held-out prompts: 22 samples" in capsys.readouterr().out
