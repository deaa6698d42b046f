"""Imagen's dynamic / static thresholding against a numpy reference of the paper's rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from t2i.diffusion.thresholding import DynamicThresholding, batch_quantile, dynamic_threshold
from t2i.errors import ConfigError


def numpy_dynamic_threshold(x0: np.ndarray, p: float) -> np.ndarray:
    """Saharia et al. 2022, Fig. A.10: s = max(1, percentile(|x0|, p)); x0 = clip(x0, -s, s) / s, per sample."""
    out = np.empty_like(x0)
    for i, sample in enumerate(x0):
        s = max(1.0, np.quantile(np.abs(sample), p))
        out[i] = np.clip(sample, -s, s) / s
    return out


def inputs() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float64)
    scale = torch.tensor([3.0, 1.5, 0.2, 0.4], dtype=torch.float64).reshape(-1, 1, 1, 1)
    return x0 * scale  # the last two samples lie (almost) inside [-1, 1]


@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 0.995, 1.0])
def test_batch_quantile_matches_numpy(q):
    values = torch.randn(3, 1001, dtype=torch.float64)
    np.testing.assert_allclose(
        batch_quantile(values, q).numpy(), np.quantile(values.numpy(), q, axis=1), rtol=1e-12
    )


@pytest.mark.parametrize("p", [0.9, 0.995])
def test_dynamic_threshold_matches_numpy(p):
    x0 = inputs()
    out = dynamic_threshold(x0, p)
    np.testing.assert_allclose(out.numpy(), numpy_dynamic_threshold(x0.numpy(), p), rtol=1e-12, atol=1e-12)
    assert out[:2].abs().amax(dim=(1, 2, 3)).max() <= 1.0
    small = x0[2].abs().max() <= 1
    if small:
        torch.testing.assert_close(out[2], x0[2])


def test_wrapper_thresholds_the_inner_x0_and_forwards_the_sigma_range():
    x0 = inputs()

    class Inner:
        sigma_min, sigma_max = 0.002, 80.0

        def __call__(self, x, sigma, cond=None):
            return x0

    x, sigma = torch.zeros_like(x0), torch.ones(4)
    wrapped = DynamicThresholding(Inner(), percentile=0.9)
    assert (wrapped.sigma_min, wrapped.sigma_max) == (0.002, 80.0)
    np.testing.assert_allclose(wrapped(x, sigma).numpy(), numpy_dynamic_threshold(x0.numpy(), 0.9))
    torch.testing.assert_close(DynamicThresholding(Inner(), enabled=False)(x, sigma), x0)
    torch.testing.assert_close(DynamicThresholding(Inner(), method="static")(x, sigma), x0.clamp(-1, 1))


def test_half_precision_and_bad_options():
    x0 = (inputs() * 2).to(torch.bfloat16)
    out = dynamic_threshold(x0, 0.995)
    assert out.dtype == torch.bfloat16 and out.float().abs().max() <= 1.0
    with pytest.raises(ConfigError, match="thresholding"):
        DynamicThresholding(lambda *a: a[0], method="soft")
    with pytest.raises(ConfigError, match="percentile"):
        DynamicThresholding(lambda *a: a[0], percentile=99.5)
