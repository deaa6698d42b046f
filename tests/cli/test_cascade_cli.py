"""`t2i demo --family imagen` and `t2i sample` on the cascade folder it writes, through the CLI entry point."""

from __future__ import annotations

import json

from PIL import Image

from t2i.cli.main import main


def test_imagen_demo_family_writes_a_cascade_that_t2i_sample_runs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--family", "imagen", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["accuracy"]) >= {"colour", "shape", "position"}
    assert (out / "cascade" / "cascade.yaml").is_file()

    png = tmp_path / "sample.png"
    code = main(["sample", "--model", str(out / "cascade"), "--prompt", "a red circle in the top left",
                 "--out", str(png), "--seed", "3", "--steps", "2"])  # fmt: skip
    assert code == 0
    with Image.open(png) as image:
        final_size = image.size
    assert final_size[0] == final_size[1] and final_size[0] > 16  # the SR stage's size, not the base's

