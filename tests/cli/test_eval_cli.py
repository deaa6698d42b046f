"""`t2i eval shapes` with stand-in pipelines (the real pipeline is tested in tests/pipelines)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

import t2i.cli.eval as eval_cli
from t2i.cli.main import main
from t2i.data.shapes import HELDOUT_COMBOS, draw_shape, parse_caption


class PerfectPipeline:
    """Draws exactly what the prompt asks for; records the keyword arguments it was called with."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def generate(self, prompts, steps=None, sampler=None, guidance_scale=None, seed=None):
        self.calls.append({"n": len(prompts), "steps": steps, "sampler": sampler, "guidance": guidance_scale,
                           "seed": seed})  # fmt: skip
        rng = np.random.default_rng(seed)
        return [draw_shape(*parse_caption(p), size=32, rng=rng) for p in prompts]


class BlankPipeline:
    def generate(self, prompts, **kwargs):
        return [Image.new("RGB", (32, 32), (255, 255, 255)) for _ in prompts]


def test_evaluate_shapes_scores_a_perfect_and_a_blank_model() -> None:
    prompts = eval_cli.split_prompts("heldout", 30)
    assert len(prompts) == 30 and parse_caption(prompts[0]) == HELDOUT_COMBOS[0]
    pipe = PerfectPipeline()
    scores, images = eval_cli.evaluate_shapes(pipe, prompts, steps=7, guidance=3.0, seed=10, batch_size=16)
    assert scores == {"colour": 1.0, "shape": 1.0, "position": 1.0, "all": 1.0, "n": 30.0}
    assert len(images) == 30
    assert pipe.calls == [
        {"n": 16, "steps": 7, "sampler": None, "guidance": 3.0, "seed": 10},
        {"n": 14, "steps": 7, "sampler": None, "guidance": 3.0, "seed": 11},
    ]
    blank, _ = eval_cli.evaluate_shapes(BlankPipeline(), prompts)
    assert blank["all"] == 0.0


def test_eval_shapes_cli_prints_and_writes_grid(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(eval_cli, "load_model", lambda path: PerfectPipeline())
    grid = tmp_path / "grid.png"
    argv = ["eval", "shapes", "--model", "unused", "--num", "5", "--split", "train", "--out", str(grid)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "all      1.000" in out and "5 prompts" in out
    assert Image.open(grid).width >= 5 * 96
