"""`t2i data shapes` through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

from t2i.cli.main import main
from t2i.data.readers import build_dataset
from t2i.data.shapes import HELDOUT_COMBOS, parse_caption


def test_data_shapes_writes_readable_shards(tmp_path: Path, capsys) -> None:
    out = tmp_path / "shapes"
    argv = [
        "data",
        "shapes",
        "--out",
        str(out),
        "--num",
        "30",
        "--size",
        "32",
        "--seed",
        "3",
        "--shard-size",
        "16",
    ]
    assert main(argv) == 0
    assert "30 images" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.tar")) == ["shapes-00000.tar", "shapes-00001.tar"]
    samples = list(build_dataset(str(out / "shapes-{00000..00001}.tar"), 32))
    assert len(samples) == 30
    assert all(parse_caption(s["captions"]) not in HELDOUT_COMBOS for s in samples)
    assert json.loads((out / "split.json").read_text())["num"] == 30


def test_data_shapes_bad_split_and_missing_action(tmp_path: Path, capsys) -> None:
    assert main(["data"]) == 2
    try:
        main(["data", "shapes", "--out", str(tmp_path), "--split", "test"])
    except SystemExit as exit_:
        assert exit_.code == 2
    assert main(["data", "shapes", "--out", str(tmp_path), "--num", "1", "--size", "4"]) == 2
    assert "size >= 12" in capsys.readouterr().err
