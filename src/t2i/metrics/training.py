"""Evaluation during training: sample fixed prompts, score them, log the curve (TensorBoard, ``OUT/eval.png``).

The trainer calls an `Evaluator` every ``trainer.eval_every`` steps on rank 0, with the task's
``sample_images(prompts, seed) -> list[PIL.Image]`` (EMA weights swapped in, eval mode, no grad)::

    evaluator = shapes_evaluator(out_dir, image_size=cfg.data.resolution)   # once, before the loop
    ...
    if _due(step, cfg.trainer.eval_every, ...):
        scores = evaluator(step, task.sample_images, writer=logger.writer)  # {"eval/colour": 0.9, ...}

Each call appends to ``OUT/eval.json`` (the history survives a resume: entries at or after a re-evaluated
step are replaced), redraws ``OUT/eval.png`` (both atomic) and adds one TensorBoard scalar per metric.

A metric is any callable ``(images, prompts) -> dict[str, float]``: `ShapesAccuracy` (the analytic judge),
`FeatureDistance` (FID and KID against reference features: the judge's features for the shapes data, or the
FID Inception's on a small reference set), `ClipScoreMetric`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from t2i.errors import InvalidInputError
from t2i.metrics.curves import EvalHistory, write_eval_curves
from t2i.metrics.features import FeatureExtractor
from t2i.metrics.stats import FeatureSet, frechet_distance, kernel_inception_distance

SampleImages = Callable[[list[str], int], list[Image.Image]]


class Metric(Protocol):
    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, float]: ...


class ShapesAccuracy:
    """Colour / shape / position / all-three accuracy of the analytic judge (`t2i.data.judge.score`)."""

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, float]:
        from t2i.data.judge import score

        scores = score(images, prompts)
        return {name: scores[name] for name in ("colour", "shape", "position", "all")}


class PairsAccuracy:
    """Two-object binding accuracy (`t2i.data.judge_pairs.score_pairs`): each object's colour and shape, their
    binding, the relation, and the whole prompt (`all`)."""

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, float]:
        from t2i.data.judge_pairs import score_pairs

        scores = score_pairs(images, prompts)
        return {name: scores[name] for name in ("colour", "shape", "binding", "relation", "all")}


class FeatureDistance:
    """FID and KID of the generated images against fixed reference features.

    KID uses subsets of ``min(kid_subset_size, N_reference, N_generated)`` rows; `label` names the metrics
    (``fid_{label}``, ``kid_{label}``).
    """

    def __init__(self, extractor: FeatureExtractor, reference: FeatureSet, label: str,
                 kid_subsets: int = 100, kid_subset_size: int = 1000, batch_size: int = 50) -> None:  # fmt: skip
        if reference.extractor != extractor.name:
            raise InvalidInputError(
                f"reference features come from {reference.extractor!r}, not {extractor.name!r}"
            )
        self.extractor, self.reference, self.label = extractor, reference, label
        self.kid_subsets, self.kid_subset_size, self.batch_size = kid_subsets, kid_subset_size, batch_size

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, float]:
        from t2i.metrics.features import extract_features

        fake = extract_features(self.extractor, images, self.batch_size, total=len(images), progress=False)
        size = min(self.kid_subset_size, len(self.reference), len(fake))
        kid, _ = kernel_inception_distance(self.reference.features, fake, self.kid_subsets, size)
        return {
            f"fid_{self.label}": frechet_distance(self.reference.features, fake),
            f"kid_{self.label}": kid,
        }


class ClipScoreMetric:
    """Mean CLIP score of (image, prompt) pairs with a loaded `t2i.metrics.clip_score.ClipScorer`."""

    def __init__(self, scorer: Any, batch_size: int = 32) -> None:
        self.scorer, self.batch_size = scorer, batch_size

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, float]:
        from t2i.metrics.clip_score import clip_score

        mean, _ = clip_score(self.scorer, list(images), list(prompts), self.batch_size, progress=False)
        return {"clip_score": mean}


class Evaluator:
    """Samples `prompts` once per seed, runs every metric on the images, records and draws the history."""

    def __init__(self, out_dir: str | Path, prompts: Sequence[str], metrics: Sequence[Metric],
                 seeds: Sequence[int] = (0,)) -> None:  # fmt: skip
        if not prompts or not metrics or not seeds:
            raise InvalidInputError("evaluator: need at least one prompt, one metric and one seed")
        self.out_dir = Path(out_dir)
        self.prompts, self.metrics, self.seeds = list(prompts), list(metrics), list(seeds)
        self.history = EvalHistory.load(self.history_path)

    @property
    def history_path(self) -> Path:
        return self.out_dir / "eval.json"

    @property
    def curve_path(self) -> Path:
        return self.out_dir / "eval.png"

    def __call__(self, step: int, sample_images: SampleImages, writer: Any = None) -> dict[str, float]:
        """Evaluate at `step`; returns ``{"eval/NAME": value}``; `writer` is a TensorBoard SummaryWriter (or None)."""
        images: list[Image.Image] = []
        for seed in self.seeds:
            images += sample_images(list(self.prompts), seed)
        prompts = self.prompts * len(self.seeds)
        if len(images) != len(prompts):
            raise InvalidInputError(
                f"evaluator: sample_images returned {len(images)} images for {len(prompts)} prompts"
            )
        scores: dict[str, float] = {}
        for metric in self.metrics:
            scores.update({f"eval/{name}": value for name, value in metric(images, prompts).items()})
        self.history.add(step, scores)
        self.history.save(self.history_path)
        write_eval_curves(self.history, self.curve_path)
        if writer is not None:
            for name, value in scores.items():
                writer.add_scalar(name, value, step)
            writer.flush()
        return scores


def judge_reference(
    prompts: Sequence[str], image_size: int, per_prompt: int = 4, seed: int = 0
) -> FeatureSet:
    """Judge features of `per_prompt` dataset renderings of each shapes prompt."""
    from t2i.metrics.judge_features import JudgeFeatures, shapes_reference_images

    extractor = JudgeFeatures()
    images = shapes_reference_images(prompts, image_size, per_prompt, seed)
    return FeatureSet(extractor(images), extractor.name)


def shapes_evaluator(
    out_dir: str | Path,
    image_size: int,
    split: str = "heldout",
    seeds: Sequence[int] = (0,),
    fid: bool = True,
    reference_per_prompt: int = 4,
    task: str = "single",
) -> Evaluator:
    """The captioned-shapes evaluation: judge accuracy on every prompt of `split` and, with `fid`, judge FID/KID
    against `reference_per_prompt` dataset renderings per prompt at `image_size` px. `task` two-objects: the
    two-object scenes' held-out prompts scored for binding (`PairsAccuracy`; the judge's features, and so `fid`,
    describe one object, so it is not computed)."""
    from t2i.data.shapes import heldout_prompts, training_prompts
    from t2i.metrics.judge_features import JudgeFeatures

    if split not in ("heldout", "train"):
        raise InvalidInputError(f"split: expected heldout or train, got {split!r}")
    if task == "two-objects":
        from t2i.data.shapes_pairs import pair_caption, scenes_for_split

        pairs = [pair_caption(scene) for scene in scenes_for_split(split)]
        return Evaluator(out_dir, pairs, [PairsAccuracy()], seeds)
    if task != "single":
        raise InvalidInputError(f"task: expected single or two-objects, got {task!r}")
    prompts = heldout_prompts() if split == "heldout" else training_prompts()
    metrics: list[Metric] = [ShapesAccuracy()]
    if fid:
        reference = judge_reference(prompts, image_size, reference_per_prompt)
        metrics.append(FeatureDistance(JudgeFeatures(), reference, label="judge"))
    return Evaluator(out_dir, prompts, metrics, seeds)
