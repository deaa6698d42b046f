"""The training-time evaluation hook: scores, eval.json / eval.png (atomic, resumable), TensorBoard scalars."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2i.data.shapes import BACKGROUND, draw_shape, heldout_prompts, parse_caption
from t2i.errors import DataError, InvalidInputError
from t2i.metrics.curves import EvalHistory, draw_eval_curves, write_eval_curves
from t2i.metrics.judge_features import JudgeFeatures
from t2i.metrics.training import Evaluator, FeatureDistance, judge_reference, shapes_evaluator


def perfect(prompts: list[str], seed: int) -> list[Image.Image]:
    """What `task.sample_images` of a perfect model returns: the requested shape, jittered by seed."""
    return [
        draw_shape(*parse_caption(p), size=32, rng=np.random.default_rng([seed, i]))
        for i, p in enumerate(prompts)
    ]


def blank(prompts: list[str], seed: int) -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), BACKGROUND) for _ in prompts]


class Writer:
    """Records what a TensorBoard SummaryWriter would receive."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.flushes = 0

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        self.flushes += 1


def test_shapes_evaluator_scores_logs_and_draws(tmp_path: Path) -> None:
    evaluator = shapes_evaluator(tmp_path, image_size=32, seeds=(0, 1))
    writer = Writer()
    good = evaluator(100, perfect, writer=writer)
    bad = evaluator(200, blank, writer=writer)
    assert good["eval/colour"] == good["eval/all"] == 1.0 and bad["eval/all"] == 0.0
    assert good["eval/fid_judge"] < 0.05 and bad["eval/fid_judge"] > 1.0
    assert bad["eval/kid_judge"] > good["eval/kid_judge"] + 0.5
    assert {t for t, _, s in writer.scalars if s == 100} == set(good) and writer.flushes == 2
    history = json.loads((tmp_path / "eval.json").read_text())
    assert history["steps"] == [100, 200] and history["values"]["eval/colour"] == [1.0, 0.0]
    curve = Image.open(tmp_path / "eval.png")
    assert curve.width == 640 and curve.height > 6 * 140  # one panel per metric
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "eval.png"]  # no temporary files left


def test_two_object_evaluator_scores_binding_on_the_pair_scenes(tmp_path: Path) -> None:
    from t2i.data.shapes_pairs import draw_pair, heldout_pair_prompts, parse_pair_caption

    def perfect_pairs(prompts: list[str], seed: int) -> list[Image.Image]:
        return [draw_pair(parse_pair_caption(p), 32, np.random.default_rng([seed, i])) for i, p in enumerate(prompts)]

    def one_object(prompts: list[str], seed: int) -> list[Image.Image]:  # only the first object of each scene
        return [draw_shape(*parse_pair_caption(p)[:2], "left", size=32) for p in prompts]

    evaluator = shapes_evaluator(tmp_path, image_size=32, task="two-objects")
    assert evaluator.prompts == heldout_pair_prompts()
    good, bad = evaluator(10, perfect_pairs), evaluator(20, one_object)
    assert set(good) == {f"eval/{k}" for k in ("colour", "shape", "binding", "relation", "all")}
    assert good["eval/all"] == 1.0 and bad["eval/all"] == 0.0
    with pytest.raises(InvalidInputError, match="two-objects"):
        shapes_evaluator(tmp_path, image_size=32, task="pairs")


def test_history_survives_a_resume_and_redone_steps_replace_later_ones(tmp_path: Path) -> None:
    prompts = heldout_prompts()[:4]
    reference = judge_reference(prompts, 32)
    metric = FeatureDistance(JudgeFeatures(), reference, label="judge", kid_subset_size=8)
    first = Evaluator(tmp_path, prompts, [metric])
    for step in (10, 20, 30):
        first(step, perfect)
    resumed = Evaluator(tmp_path, prompts, [metric])  # e.g. resumed from the checkpoint at step 20
    assert resumed.history.steps == [10, 20, 30]
    resumed(20, blank)
    assert resumed.history.steps == [10, 20]
    fids = resumed.history.values["eval/fid_judge"]
    assert fids[1] > fids[0] and json.loads((tmp_path / "eval.json").read_text())["steps"] == [10, 20]


def test_history_add_fills_metrics_that_appear_later_with_nan() -> None:
    history = EvalHistory()
    history.add(1, {"a": 1.0})
    history.add(2, {"b": 2.0})
    assert math.isnan(history.values["b"][0]) and math.isnan(history.values["a"][1])
    image = draw_eval_curves(history)
    assert image.size == (640, 2 * 150 + 14)


def test_curve_writer_is_atomic_and_draws_points(tmp_path: Path) -> None:
    history = EvalHistory()
    for step, value in ((0, 3.0), (50, 1.0), (100, 2.0)):
        history.add(step, {"eval/fid": value})
    path = write_eval_curves(history, tmp_path / "out" / "eval.png")
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert (np.abs(pixels.astype(int) - [30, 90, 200]).sum(-1) < 30).sum() > 50  # the blue curve is drawn
    assert [p.name for p in path.parent.iterdir()] == ["eval.png"]


def test_bad_history_file_and_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "eval.json").write_text("{not json")
    with pytest.raises(DataError) as info:
        shapes_evaluator(tmp_path, image_size=32, fid=False)
    assert "\n" not in str(info.value) and "eval.json" in str(info.value)
    with pytest.raises(InvalidInputError):
        shapes_evaluator(tmp_path / "x", image_size=32, split="test")
    evaluator = shapes_evaluator(tmp_path / "y", image_size=32, fid=False)
    with pytest.raises(InvalidInputError, match="returned 1 images"):
        evaluator(1, lambda prompts, seed: perfect(prompts[:1], seed))
