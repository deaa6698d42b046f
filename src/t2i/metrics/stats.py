"""Distances between two sets of image features: Fréchet distance (FID) and kernel distance (KID).

Both work on feature matrices (N, D), whatever extracted them (the FID Inception, the shapes judge, any
nn.Module), and compute in float64.

- Fréchet distance (Heusel et al. 2017, "GANs trained by a two time-scale update rule..."): the distance
  between the Gaussians fitted to the two sets, ``|mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))`` with
  unbiased (N - 1) covariances, as pytorch-fid, torch-fidelity and torchmetrics compute it.
- KID (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimate of MMD^2 under the cubic
  polynomial kernel ``k(x, y) = (x.y / D + 1)^3``, averaged over random subsets; the mean and the population
  standard deviation over subsets are reported, as torch-fidelity and torchmetrics do.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from t2i.errors import InvalidInputError, PipelineLoadError
from t2i.metrics.files import atomic_write_bytes


def _as_float64(features: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    x = torch.as_tensor(features).detach().to("cpu", torch.float64)
    if x.dim() != 2 or x.shape[0] < 2:
        raise InvalidInputError(f"{name}: expected a (N >= 2, D) feature matrix, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise InvalidInputError(f"{name}: features contain NaN or infinity")
    return x


def mean_and_covariance(features: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of `features` (N, D), in float64."""
    x = _as_float64(features, "features")
    mean = x.mean(dim=0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def _covariance_factor(features: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """F with ``F F^T = cov``: the scaled centred data (D, N) when N <= D, else a Cholesky factor (D, D),
    else (a singular covariance) the symmetric square root from an eigendecomposition."""
    n, d = features.shape
    if n <= d:
        return (features - features.mean(dim=0)).T / (n - 1) ** 0.5
    factor, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        return factor
    eigenvalues, vectors = torch.linalg.eigh(cov)
    return vectors * eigenvalues.clamp(min=0).sqrt()


def trace_sqrt_product(factor_1: torch.Tensor, cov_2: torch.Tensor) -> torch.Tensor:
    """``tr((S_1 S_2)^(1/2))`` for S_1 = F_1 F_1^T and a symmetric PSD S_2.

    The eigenvalues of S_1 S_2 = F_1 F_1^T S_2 are those of the symmetric PSD ``F_1^T S_2 F_1`` (plus zeros),
    so the trace is the sum of the square roots of that matrix's eigenvalues: real and non-negative, also for
    singular covariances, and only (N_1, N_1) large when the first set is small.
    """
    middle = factor_1.T @ cov_2 @ factor_1
    return torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()


def frechet_distance(features_1: torch.Tensor | np.ndarray, features_2: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance ``|mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))`` between the Gaussians
    fitted to two feature sets (N1, D) and (N2, D)."""
    x, y = _as_float64(features_1, "features"), _as_float64(features_2, "features")
    if x.shape[1] != y.shape[1]:
        raise InvalidInputError(f"frechet_distance: feature sizes differ ({x.shape[1]} vs {y.shape[1]})")
    if len(y) < len(x):  # tr((S_1 S_2)^(1/2)) is symmetric; factor the smaller set
        x, y = y, x
    mean_1, cov_1 = mean_and_covariance(x)
    mean_2, cov_2 = mean_and_covariance(y)
    trace_sqrt = trace_sqrt_product(_covariance_factor(x, cov_1), cov_2)
    distance = (mean_1 - mean_2).square().sum() + cov_1.trace() + cov_2.trace() - 2 * trace_sqrt
    return float(distance.clamp(min=0))


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef: float = 1.0) -> torch.Tensor:
    """``(x y^T / D + coef)^degree`` for x (N, D), y (M, D) -> (N, M)."""
    return (x @ y.T / x.shape[1] + coef) ** degree


def unbiased_mmd2(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef: float = 1.0) -> torch.Tensor:
    """Unbiased MMD^2 between equally sized samples x, y (m, D): the kernel means without the diagonals.

    ``sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1)) - 2 sum_{i,j} k(x_i, y_j) / m^2``
    """
    m = x.shape[0]
    k_xx = polynomial_kernel(x, x, degree, coef)
    k_yy = polynomial_kernel(y, y, degree, coef)
    k_xy = polynomial_kernel(x, y, degree, coef)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_xy.sum() / m**2


def kid_subsets(
    n_real: int, n_fake: int, subsets: int, subset_size: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Row indices ``(real, fake)`` of each KID subset: the first `subset_size` of a random permutation.

    Drawn from ``torch.Generator().manual_seed(seed)`` in torchmetrics' order (real, then fake, per subset), so
    a torchmetrics KID computed after ``torch.manual_seed(seed)`` uses the same subsets.
    """
    if subsets < 1 or subset_size < 2:
        raise InvalidInputError(f"KID: need subsets >= 1 and subset_size >= 2, got {subsets}/{subset_size}")
    if subset_size > min(n_real, n_fake):
        raise InvalidInputError(
            f"KID: subset_size {subset_size} is larger than the feature sets ({n_real} real, {n_fake} generated)"
        )
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(subsets):
        real = torch.randperm(n_real, generator=generator)[:subset_size]
        fake = torch.randperm(n_fake, generator=generator)[:subset_size]
        out.append((real, fake))
    return out


def kernel_inception_distance(
    real: torch.Tensor | np.ndarray,
    fake: torch.Tensor | np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    degree: int = 3,
    coef: float = 1.0,
) -> tuple[float, float]:
    """KID between feature sets real (N1, D) and fake (N2, D): (mean, population std) of the unbiased MMD^2
    over `subsets` random subsets of `subset_size` rows each (torchmetrics' defaults: 100 x 1000)."""
    x = _as_float64(real, "real features")
    y = _as_float64(fake, "generated features")
    if x.shape[1] != y.shape[1]:
        raise InvalidInputError(f"KID: feature sizes differ ({x.shape[1]} vs {y.shape[1]})")
    values = torch.stack(
        [
            unbiased_mmd2(x[r], y[f], degree, coef)
            for r, f in kid_subsets(len(x), len(y), subsets, subset_size, seed)
        ]
    )
    return float(values.mean()), float(values.std(unbiased=False))


@dataclass
class FeatureSet:
    """Features (N, D) of a set of images and the name of the extractor that produced them.

    Saved as ``.npz`` (arrays ``features`` and ``extractor``) so a reference set is extracted once.
    """

    features: torch.Tensor
    extractor: str

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.npz) atomically."""
        buffer = io.BytesIO()
        np.savez(buffer, features=self.features.cpu().numpy(), extractor=np.array(self.extractor))
        return atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path, expected_extractor: str | None = None) -> FeatureSet:
        """Read a FeatureSet; PipelineLoadError when the file is not one or came from another extractor."""
        try:
            with np.load(path, allow_pickle=False) as data:
                features, extractor = torch.from_numpy(data["features"].copy()), str(data["extractor"])
        except (OSError, KeyError, ValueError) as exc:
            raise PipelineLoadError(
                f"{path}: cannot read features ({exc.__class__.__name__}); expected an .npz written by t2i eval"
            ) from exc
        if expected_extractor is not None and extractor != expected_extractor:
            raise PipelineLoadError(
                f"{path}: features come from {extractor!r}, not {expected_extractor!r}; extract them again"
            )
        return cls(features, extractor)
