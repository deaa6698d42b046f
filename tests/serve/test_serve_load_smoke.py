"""benchmarks/serve_load.py runs end to end at `--smoke` on the tiny model and prints its ratio line (no timing
is asserted: figures live in BENCHMARKS.md)."""

from __future__ import annotations

import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_serve_load_smoke_reports_both_servers_and_a_ratio(model_dir, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import serve_load

    results = serve_load.main(["--smoke", "--model", str(model_dir), "--size", "16x16", "--threads", "1"])
    out = capsys.readouterr().out
    assert set(results) == {4, 1}
    for r in results.values():
        assert r["images_per_s"] > 0 and r["p50"] <= r["p99"] and 0 < r["rss_before"] <= r["rss_peak"]
    assert re.search(r"^ratio line: .* = \d+\.\d+$", out, re.MULTILINE), out
    assert "--max-batch 4" in out and "--max-batch 1" in out
