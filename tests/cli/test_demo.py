"""`t2i demo --quick`: every phase runs end to end and leaves its artefacts (accuracy is meaningless here)."""

from __future__ import annotations

import json

from t2i.cli.main import main


def test_quick_sd_demo_runs_all_phases(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--family", "sd", "--quick", "--out", str(out), "--threads", "1", "--seed", "3"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["seed"] == 3
    assert all("seed: 3\n" in (out / run / "config.yaml").read_text() for run in ("vae", "unet"))
    assert list(results["seconds"]) == ["data", "vae", "precache", "unet", "eval", "check"]
    assert results["threads"] == dict.fromkeys(results["seconds"], 1)
    accuracy = results["accuracy"]
    assert accuracy["n"] == 22  # one sample per held-out combination
    assert all(0.0 <= accuracy[k] <= 1.0 for k in ("colour", "shape", "position", "all"))
    assert (out / "grid.png").stat().st_size > 0
    assert (out / "vae" / "export" / "config.json").is_file()
    assert json.loads((out / "latents" / "stats.json").read_text())["num_samples"] == 32
    assert (out / "pipeline" / "model_index.json").is_file() and (out / "pipeline" / "t2i.yaml").is_file()
    assert "held-out prompts: 22 samples" in capsys.readouterr().out


def test_quick_default_demo_trains_a_transformer_and_exports_a_flux_folder(tmp_path, capsys):
    import t2i
    from t2i.recipes.demo_common import _usable_cores

    out = tmp_path / "flow"
    assert main(["demo", "--quick", "--out", str(out)]) == 0  # the flow family, threads picked per phase
    results = json.loads((out / "results.json").read_text())
    assert list(results["seconds"]) == ["data", "vae", "precache", "transformer", "eval", "check"]
    assert list(results["threads"]) == list(results["seconds"])
    assert all(1 <= n <= _usable_cores() for n in results["threads"].values())
    assert (out / "unet" / "eval.png").stat().st_size > 0  # trainer.eval_every: the held-out judge curve
    assert results["accuracy"]["n"] == 22 and results["settings"]["model_config"] == "demo/shapes-flow"
    pipe = t2i.load_pipeline(out / "pipeline")
    assert type(pipe).__name__ == "FluxPipeline"
    assert pipe.generate("a red circle in the top left", steps=2, seed=0, progress=False).images[0].size == (32, 32)


def test_quick_two_object_demo_scores_binding_and_relation(tmp_path, capsys):
    out = tmp_path / "pairs"
    assert main(["demo", "--task", "two-objects", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    accuracy = results["accuracy"]
    assert accuracy["n"] == 96 and set(accuracy) >= {"colour", "shape", "binding", "relation", "all", "count"}
    assert results["targets"] == {"all": 0.8}
    from t2i.data.shapes_pairs import parse_pair_caption

    captions = (out / "data").glob("*.tar")
    assert next(captions).is_file() and parse_pair_caption("a red circle above a blue cross") is not None
    assert "all        " in capsys.readouterr().out
    code = main(["demo", "--family", "imagen", "--task", "two-objects", "--quick", "--out", str(tmp_path / "x")])
    assert code == 2
