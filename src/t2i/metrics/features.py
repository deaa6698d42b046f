"""Feature extractors: a list of PIL images -> a feature matrix (N, D), and the batched extraction loop.

An extractor is any object with ``name: str`` (identifies the feature space, e.g. in cached reference files)
and ``__call__(images: list[PIL.Image]) -> Tensor (N, D)``. `ModuleFeatures` adapts an nn.Module that takes
uint8 images (B, 3, H, W) (the FID Inception, or the custom ``feature`` module torchmetrics accepts);
`t2i.metrics.judge_features.JudgeFeatures` computes the shapes judge's evidence.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn

from t2i.errors import InvalidInputError


class FeatureExtractor(Protocol):
    name: str

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor: ...


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


class ModuleFeatures:
    """Runs `module` on uint8 images (B, 3, H, W); images of different sizes go through in separate batches.

    The output rows are in the order of the input images, on the CPU, in the module's output dtype.
    """

    def __init__(self, module: nn.Module, name: str, device: str | torch.device = "cpu") -> None:
        self.module = module.to(device).eval()
        self.name = name
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        tensors = [pil_to_uint8(image) for image in images]
        by_size: dict[tuple[int, ...], list[int]] = {}
        for index, tensor in enumerate(tensors):
            by_size.setdefault(tuple(tensor.shape), []).append(index)
        rows: list[torch.Tensor | None] = [None] * len(tensors)
        for indices in by_size.values():
            batch = torch.stack([tensors[i] for i in indices]).to(self.device)
            out = self.module(batch).reshape(len(indices), -1).cpu()
            for i, row in zip(indices, out):
                rows[i] = row
        return torch.stack(rows)


def extract_features(
    extractor: FeatureExtractor,
    images: Iterable[Image.Image],
    batch_size: int = 50,
    total: int | None = None,
    desc: str = "features",
    progress: bool = True,
) -> torch.Tensor:
    """Features (N, D) of every image in `images` (any iterable, read lazily), `batch_size` at a time.

    Shows a tqdm progress bar (`desc`, `total` images when known) unless `progress` is False.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise InvalidInputError(f"batch_size: expected >= 1, got {batch_size}")
    chunks: list[torch.Tensor] = []
    batch: list[Image.Image] = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for image in images:
            batch.append(image)
            if len(batch) == batch_size:
                chunks.append(extractor(batch))
                bar.update(len(batch))
                batch = []
        if batch:
            chunks.append(extractor(batch))
            bar.update(len(batch))
    if not chunks:
        raise InvalidInputError(f"{desc}: no images to extract features from")
    return torch.cat(chunks)
