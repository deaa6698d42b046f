"""Fréchet distance and KID against independent numpy/scipy computations on random features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from t2i.errors import InvalidInputError, PipelineLoadError, T2IError
from t2i.metrics.stats import FeatureSet, frechet_distance, kernel_inception_distance, kid_subsets


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's formula: scipy.linalg.sqrtm of the covariance product."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def numpy_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Binkowski et al.'s unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, written with explicit double loops' sums."""
    d = x.shape[1]
    m = x.shape[0]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = ~np.eye(m, dtype=bool)
    return float(kxx[off].sum() / (m * (m - 1)) + kyy[off].sum() / (m * (m - 1)) - 2 * kxy.mean())


def correlated_features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """`n` samples of one correlated Gaussian in `d` dimensions (the mixing matrix depends on `d` only)."""
    mixing = np.random.default_rng(d).standard_normal((d, d)) / np.sqrt(d)
    return np.random.default_rng([seed, d]).standard_normal((n, d)) @ mixing + shift


def test_frechet_distance_matches_scipy_sqrtm() -> None:
    a = correlated_features(300, 24, seed=0)
    b = correlated_features(250, 24, seed=1, shift=0.3) * 1.5
    ours, reference = frechet_distance(a, b), scipy_frechet(a, b)
    assert reference > 1.0
    assert ours == pytest.approx(reference, rel=1e-9)
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == pytest.approx(
        reference, rel=1e-5
    )


def test_frechet_distance_of_a_set_with_itself_is_zero_and_it_is_symmetric() -> None:
    a = correlated_features(100, 8, seed=2)
    b = correlated_features(120, 8, seed=3, shift=1.0)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_frechet_distance_with_fewer_samples_than_dimensions_matches_scipy() -> None:
    a = correlated_features(20, 64, seed=4)
    b = correlated_features(30, 64, seed=5, shift=0.2)
    ours = frechet_distance(a, b)
    assert ours == pytest.approx(scipy_frechet(a, b), rel=1e-6)
    assert frechet_distance(a, correlated_features(300, 64, seed=6)) == pytest.approx(
        scipy_frechet(a, correlated_features(300, 64, seed=6)), rel=1e-6
    )


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # scipy's sqrtm on the singular product
def test_frechet_distance_with_a_singular_covariance_matches_scipy() -> None:
    a = correlated_features(200, 10, seed=7)
    b = correlated_features(150, 10, seed=8, shift=0.4)
    a[:, 3] = 0.25  # a constant feature (e.g. the background colour of every image) -> Cholesky fails
    b[:, 7] = b[:, 2]  # two identical features
    assert frechet_distance(a, b) == pytest.approx(scipy_frechet(a, b), rel=1e-6)


def test_kid_matches_numpy_on_the_same_subsets() -> None:
    real = correlated_features(90, 16, seed=6)
    fake = correlated_features(70, 16, seed=7, shift=0.25)
    mean, std = kernel_inception_distance(real, fake, subsets=7, subset_size=40, seed=3)
    values = [numpy_mmd2(real[r.numpy()], fake[f.numpy()]) for r, f in kid_subsets(90, 70, 7, 40, seed=3)]
    assert mean == pytest.approx(np.mean(values), rel=1e-10)
    assert std == pytest.approx(np.std(values), rel=1e-9)
    assert mean > 0


def test_kid_with_whole_sets_is_the_full_unbiased_estimate() -> None:
    real = correlated_features(50, 10, seed=8)
    fake = correlated_features(50, 10, seed=9, shift=0.5)
    mean, std = kernel_inception_distance(real, fake, subsets=3, subset_size=50)
    assert mean == pytest.approx(numpy_mmd2(real, fake), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_is_unbiased_near_zero_for_one_distribution() -> None:
    same_a = correlated_features(400, 12, seed=10)
    same_b = correlated_features(400, 12, seed=11)
    mean, std = kernel_inception_distance(same_a, same_b, subsets=20, subset_size=200)
    shifted_mean, _ = kernel_inception_distance(same_a, same_b + 0.5, subsets=20, subset_size=200)
    assert abs(mean) < 3 * std + 1e-3
    assert shifted_mean > 20 * abs(mean)


@pytest.mark.parametrize(
    ("real", "fake", "kwargs"),
    [
        (np.zeros((10, 4)), np.zeros((10, 5)), {"subset_size": 5}),
        (np.zeros((10, 4)), np.zeros((8, 4)), {"subset_size": 9}),
        (np.zeros((1, 4)), np.zeros((8, 4)), {"subset_size": 1}),
        (np.full((10, 4), np.nan), np.zeros((10, 4)), {"subset_size": 5}),
    ],
)
def test_kid_bad_input_is_a_one_line_error(real, fake, kwargs) -> None:
    with pytest.raises(InvalidInputError) as info:
        kernel_inception_distance(real, fake, **kwargs)
    assert "\n" not in str(info.value)


def test_frechet_distance_rejects_mismatched_dimensions() -> None:
    with pytest.raises(InvalidInputError, match="feature sizes differ"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


def test_feature_set_round_trip_and_extractor_check(tmp_path: Path) -> None:
    features = torch.from_numpy(correlated_features(12, 5, seed=12)).float()
    path = FeatureSet(features, "inception-v3-fid-2048").save(tmp_path / "ref.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temporary file left behind
    loaded = FeatureSet.load(path, expected_extractor="inception-v3-fid-2048")
    assert torch.equal(loaded.features, features) and len(loaded) == 12
    with pytest.raises(PipelineLoadError, match="shapes-judge-v1"):
        FeatureSet.load(path, expected_extractor="shapes-judge-v1")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(T2IError) as info:
        FeatureSet.load(tmp_path / "bad.npz")
    assert "\n" not in str(info.value)
