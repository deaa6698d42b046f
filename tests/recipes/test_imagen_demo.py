"""`run_imagen_demo(quick=True)`: every phase of the Imagen cascade demo runs end to end and leaves a loadable
cascade folder, a grid and results.json (the accuracy of the quick run is meaningless)."""

from __future__ import annotations

import json

import yaml
from PIL import Image

from t2i.recipes.demo_common import TARGETS, format_summary
from t2i.recipes.imagen_demo import run_imagen_demo


def test_quick_imagen_demo_runs_end_to_end(tmp_path):
    import t2i

    results = run_imagen_demo(tmp_path, quick=True)
    assert set(results["seconds"]) == {"data", "precache", "base", "sr", "eval"}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["accuracy"]["n"] == 22 and set(TARGETS) <= set(saved["accuracy"])
    assert Image.open(tmp_path / "grid.png").width > 11 * 32
    cascade = t2i.load_cascade(tmp_path / "cascade", device="cpu")
    assert [s.settings.image_size for s in cascade.stages] == [16, 32]
    assert "held-out prompts: 22 samples" in format_summary(results, "")
    config = yaml.safe_load((tmp_path / "cascade" / "sr" / "config.yaml").read_text())
    assert config["trainer"]["sample"]["sampler"] == "euler_ancestral"  # the recipe reached build_task as config
    stage = json.loads((tmp_path / "cascade" / "sr" / "stage.json").read_text())
    assert stage["sampling"]["sampler"] == "euler_ancestral" and stage["sampling"]["steps"] == 2
