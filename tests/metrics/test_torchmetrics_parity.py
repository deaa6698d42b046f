"""Our FID / KID pipeline (folder -> features -> distances) against torchmetrics given the same feature network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from t2i.metrics.evaluate import StreamingScores, reference_features
from t2i.metrics.features import ModuleFeatures


class TinyFeatureNet(nn.Module):
    """A random conv net: uint8 (B, 3, H, W) -> (B, 12) float64 (float64 so both sides compute exactly)."""

    num_features = 12

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        ).double()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.double() / 8)


def random_images(n: int, seed: int, brightness: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256 - brightness, size=(n, 3, 4, 4))
    noise = rng.integers(0, brightness, size=(n, 3, 24, 24))
    return torch.from_numpy((np.kron(low, np.ones((1, 1, 6, 6))) + noise).astype(np.uint8))  # (n, 3, 24, 24)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    real, fake = random_images(60, seed=0, brightness=40), random_images(48, seed=1, brightness=90)
    folder = tmp_path_factory.mktemp("reference")
    for i, image in enumerate(to_pil(real)):
        image.save(folder / f"{i:03d}.png")
    return folder, real, fake


def ours(net: nn.Module, folder: Path, fake: torch.Tensor, **kid) -> dict[str, float]:
    extractor = ModuleFeatures(net, "tiny")
    reference = reference_features(extractor, folder, batch_size=16, progress=False)
    scores = StreamingScores(extractor)
    for start in range(0, len(fake), 20):
        scores.add(to_pil(fake[start : start + 20]))
    return scores.results(reference.features, fid=True, kid=True, **kid)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_fid_and_kid_equal_torchmetrics_with_the_same_feature_module(data) -> None:
    folder, real, fake = data
    net = TinyFeatureNet().eval()
    result = ours(net, folder, fake, kid_subsets=9, kid_subset_size=30, seed=5)

    fid = FrechetInceptionDistance(feature=net)
    kid = KernelInceptionDistance(feature=net, subsets=9, subset_size=30)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    expected_fid = float(fid.compute())
    torch.manual_seed(5)  # torchmetrics draws KID subsets from the global generator
    kid_mean, kid_std = (float(v) for v in kid.compute())

    assert expected_fid > 0.01 and kid_mean > 0
    assert result["fid"] == pytest.approx(expected_fid, rel=1e-8)
    assert result["kid_mean"] == pytest.approx(kid_mean, rel=1e-8)
    assert result["kid_std"] == pytest.approx(kid_std, rel=1e-6)
    assert result["n"] == 48 and result["kid_subset_size"] == 30


def test_kid_subset_size_is_cut_to_the_smaller_set(data) -> None:
    folder, _, fake = data
    result = ours(TinyFeatureNet().eval(), folder, fake[:10], kid_subsets=3, kid_subset_size=1000)
    assert result["kid_subset_size"] == 10
