"""CLIP score from a tiny random CLIPModel saved with transformers, against transformers' own forward pass
and torchmetrics' CLIPScore on the same model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.errors import InvalidInputError, PipelineLoadError
from t2i.metrics.clip_score import ClipScorer, _clip_image_processor_class, clip_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from sd_helpers import tiny_clip_tokenizer

PROMPTS = ["a red circle", "circle red", "a red circle in the top left", "red", "", "circle circle circle"]


def save_tiny_clip(folder: Path, aligned: bool) -> Path:
    """A random CLIPModel (32-wide towers, 32 px images) with tokenizer and image processor, saved to `folder`.

    Its cosines have both signs; `aligned` gives both towers a shared direction, so all are positive.
    """
    from transformers import CLIPConfig, CLIPModel

    tokenizer = tiny_clip_tokenizer(max_length=16)
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 16, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}  # fmt: skip
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 4}  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    if aligned:
        with torch.no_grad():
            shared = torch.randn(32) * 0.3
            model.vision_model.post_layernorm.bias.copy_(shared)
            model.text_model.final_layer_norm.bias.copy_(shared)
            model.text_projection.weight.copy_(model.visual_projection.weight)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor = _clip_image_processor_class()(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), aligned=False)


@pytest.fixture(scope="module")
def aligned_clip_folder(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("aligned_clip"), aligned=True)


def images(n: int = len(PROMPTS)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(40, 32), (32, 48), (64, 64), (33, 35), (32, 32), (50, 40)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


def reference_cosines(folder: Path, pictures: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """transformers' full CLIPModel forward: the normalised image/text embeddings it returns, pairwise."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    pixels = _clip_image_processor_class().from_pretrained(folder)(images=pictures, return_tensors="pt")
    tokens = tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    pixel_values=pixels["pixel_values"])  # fmt: skip
    return (out.image_embeds * out.text_embeds).sum(dim=-1)


@pytest.mark.parametrize("aligned", [False, True])
def test_clip_score_equals_the_formula_on_transformers_outputs(
    aligned, clip_folder, aligned_clip_folder
) -> None:
    folder = aligned_clip_folder if aligned else clip_folder
    scorer = ClipScorer.load(folder)
    pictures = images()
    cos = reference_cosines(folder, pictures, PROMPTS)
    assert (cos > 0.1).all() if aligned else ((cos > 0).any() and (cos < -0.05).any())
    mean, per_pair = clip_score(scorer, pictures, PROMPTS, batch_size=4, progress=False)
    torch.testing.assert_close(per_pair, 100 * cos.clamp(min=0), rtol=1e-5, atol=1e-4)
    assert mean == pytest.approx(float((100 * cos.clamp(min=0)).mean()), abs=1e-4)


class TensorFeatures(torch.nn.Module):
    """torchmetrics 1.9 expects transformers 4's tensors from get_*_features; transformers 5 returns outputs."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self.model.get_text_features(*args, **kwargs).pooler_output


def test_clip_score_equals_torchmetrics_on_the_same_model(aligned_clip_folder) -> None:
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import AutoTokenizer, CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(aligned_clip_folder, local_files_only=True).eval()
    if not isinstance(model.get_text_features(torch.tensor([[0, 1]])), torch.Tensor):
        model = TensorFeatures(model)
    processor = CLIPProcessor(
        image_processor=_clip_image_processor_class().from_pretrained(aligned_clip_folder),
        tokenizer=AutoTokenizer.from_pretrained(aligned_clip_folder, local_files_only=True),
    )
    metric = CLIPScore(model_name_or_path=lambda: (model, processor))
    # Prompts within the 16-token context: torchmetrics cuts longer ones off after their end token.
    prompts = ["a red circle", "circle red", "red", "", "circle circle circle", "a red red circle"]
    pictures = images()
    metric.update([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pictures], prompts)
    mean, per_pair = clip_score(ClipScorer.load(aligned_clip_folder), pictures, prompts, progress=False)
    # torchmetrics clamps the mean at 0, ours each pair: equal here, where every cosine is positive.
    assert (per_pair > 10).all()
    assert float(metric.compute()) == pytest.approx(mean, abs=1e-4)


def test_loads_offline_without_preprocessor_config(clip_folder, tmp_path, monkeypatch) -> None:
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    copy = tmp_path / "clip"
    shutil.copytree(clip_folder, copy)
    (copy / "preprocessor_config.json").unlink()
    pictures = images(3)
    torch.testing.assert_close(
        ClipScorer.load(copy).scores(pictures, PROMPTS[:3]),
        ClipScorer.load(clip_folder).scores(pictures, PROMPTS[:3]),
    )


def test_bad_folders_are_one_line_errors(clip_folder, tmp_path) -> None:
    import shutil

    text_only = tmp_path / "text_encoder"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clip_folder / name, no_tokenizer / name)
    cases = {
        tmp_path / "missing": "no config.json",
        text_only: "expected 'clip'",
        no_tokenizer: "no tokenizer",
    }
    for folder, expected in cases.items():
        with pytest.raises(PipelineLoadError, match=expected) as info:
            ClipScorer.load(folder)
        assert "\n" not in str(info.value)
    with pytest.raises(InvalidInputError, match="equally many"):
        ClipScorer.load(clip_folder).scores(images(2), ["one prompt"])
