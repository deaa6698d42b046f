"""CLIP score (Hessel et al. 2021, with torchmetrics' weight 100) from a local Hugging Face CLIP folder.

``score(image, prompt) = 100 * max(cos(E_img(image), E_txt(prompt)), 0)`` with E the projected CLIP
embeddings; the reported value is the mean over pairs. (torchmetrics' CLIPScore clamps the mean instead of each
pair; the two agree whenever every cosine is positive, which is the case for real CLIP models and captions.)

The folder is what ``CLIPModel.save_pretrained`` writes (``config.json`` with ``model_type: clip`` and the
weights) plus a tokenizer (in the folder or its ``tokenizer/``) and optionally ``preprocessor_config.json``;
without one, CLIP's standard preprocessing at the model's image size is used (bicubic resize of the shorter
side, centre crop, OpenAI mean/std). Everything is read with ``local_files_only``: nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from t2i.errors import InvalidInputError, PipelineLoadError
from t2i.text.tokenize import load_tokenizer, tokenizer_folder


def _clip_image_processor_class() -> Any:
    try:  # transformers >= 5: the PIL backend (the default one needs torchvision)
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


def _check_clip_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise PipelineLoadError(
            f"{folder}: not found or has no config.json; expected a Hugging Face CLIP folder"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PipelineLoadError(f"{config_file}: not valid JSON ({exc.__class__.__name__})") from exc
    if config.get("model_type") != "clip":
        raise PipelineLoadError(
            f"{folder}: model_type is {config.get('model_type')!r}; expected 'clip' (a CLIPModel with both towers)"
        )
    return config


def _load_image_processor(folder: Path, image_size: int) -> Any:
    cls = _clip_image_processor_class()
    if (folder / "preprocessor_config.json").is_file():
        try:
            return cls.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise PipelineLoadError(f"{folder}/preprocessor_config.json: cannot load ({exc})") from exc
    return cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


@dataclass
class ClipScorer:
    """A CLIPModel with its tokenizer and image processor; call `scores(images, prompts)`."""

    model: Any
    tokenizer: Any
    image_processor: Any
    device: torch.device

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ClipScorer:
        """Load a local CLIP folder (see the module docstring); one-line PipelineLoadError when it is not one."""
        from transformers import CLIPModel

        folder = Path(path)
        _check_clip_config(folder)
        try:
            model, info = CLIPModel.from_pretrained(
                str(folder), local_files_only=True, output_loading_info=True
            )
        except (OSError, ValueError) as exc:
            raise PipelineLoadError(
                f"{folder}: cannot load CLIPModel ({exc.__class__.__name__}: {exc})"
            ) from exc
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise PipelineLoadError(
                f"{folder}: CLIP weights missing {len(missing)} key(s), e.g. {missing[:3]}"
            )
        tokenizer = load_tokenizer(tokenizer_folder(str(folder), None))
        processor = _load_image_processor(folder, model.config.vision_config.image_size)
        device = torch.device(device)
        return cls(model.to(device).eval(), tokenizer, processor, device)

    @staticmethod
    def _embeddings(output: Any) -> torch.Tensor:
        # transformers 4 returns the projected embeddings; 5 returns an output whose pooler_output holds them.
        tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
        return torch.nn.functional.normalize(tensor.float(), dim=-1)

    @torch.no_grad()
    def cosines(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity (N,) between each image and its prompt."""
        if len(images) != len(prompts) or not images:
            raise InvalidInputError(
                f"CLIP score: need equally many images and prompts (> 0), got {len(images)}/{len(prompts)}"
            )
        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        text = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        )
        image_emb = self._embeddings(
            self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))
        )
        text_emb = self._embeddings(
            self.model.get_text_features(
                input_ids=text["input_ids"].to(self.device),
                attention_mask=text["attention_mask"].to(self.device),
            )
        )
        return (image_emb * text_emb).sum(dim=-1).cpu()

    def scores(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """Per-pair CLIP scores ``100 * max(cos, 0)`` (N,)."""
        return 100 * self.cosines(images, prompts).clamp(min=0)


def clip_score(
    scorer: ClipScorer,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[float, torch.Tensor]:
    """Mean CLIP score over the (image, prompt) pairs and the per-pair scores (N,), `batch_size` at a time."""
    from tqdm.auto import tqdm

    if len(images) != len(prompts) or not images:
        raise InvalidInputError(
            f"CLIP score: need equally many images and prompts (> 0), got {len(images)}/{len(prompts)}"
        )
    if batch_size < 1:
        raise InvalidInputError(f"batch_size: expected >= 1, got {batch_size}")
    parts = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="CLIP score", unit="batch", disable=not progress, leave=False):
        parts.append(scorer.scores(images[start : start + batch_size], prompts[start : start + batch_size]))
    scores = torch.cat(parts)
    return float(scores.mean()), scores
