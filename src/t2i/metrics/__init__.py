"""Image metrics: FID / KID (FID Inception-v3 from a local file, or any feature extractor), the shapes judge's
feature space, CLIP score from a local CLIP folder, and the evaluation hook the trainer calls.

Layering: imports data/, text/ (local tokenizer loading) and errors only; pipelines and the trainer hand it
images (PIL) and prompts.
"""

from t2i.metrics.clip_score import ClipScorer, clip_score
from t2i.metrics.curves import EvalHistory, draw_eval_curves, write_eval_curves
from t2i.metrics.features import FeatureExtractor, ModuleFeatures, extract_features
from t2i.metrics.images import iter_images, read_prompts
from t2i.metrics.inception import InceptionV3FID, load_fid_inception
from t2i.metrics.judge_features import JudgeFeatures, judge_feature_vector
from t2i.metrics.stats import FeatureSet, frechet_distance, kernel_inception_distance
from t2i.metrics.training import Evaluator, FeatureDistance, ShapesAccuracy, shapes_evaluator

__all__ = [
    "ClipScorer",
    "EvalHistory",
    "Evaluator",
    "FeatureDistance",
    "FeatureExtractor",
    "FeatureSet",
    "InceptionV3FID",
    "JudgeFeatures",
    "ModuleFeatures",
    "ShapesAccuracy",
    "clip_score",
    "draw_eval_curves",
    "extract_features",
    "frechet_distance",
    "iter_images",
    "judge_feature_vector",
    "kernel_inception_distance",
    "load_fid_inception",
    "read_prompts",
    "shapes_evaluator",
    "write_eval_curves",
]
