"""What a network predicts, under one set of names: `eps` (the noise), `v` (velocity) or `x0` (the clean sample).

Configs and files spell these several ways: NeMo's `parameterization` (eps, v, x0), diffusers'
`prediction_type` (epsilon, v_prediction, sample) and NeMo's Imagen `pred_objective` (noise, x_start, v).
`normalize_prediction` maps every spelling to `eps | v | x0`; `DIFFUSERS_PREDICTION` maps back at the diffusers
boundary.

On the VE scale of the denoiser contract (x = x0 + sigma eps, the VP sample being x / sqrt(1 + sigma^2)):
    eps -> x0 = x - sigma out
    v   -> x0 = x / (1 + sigma^2) - sigma out / sqrt(1 + sigma^2)   (v = alpha eps - sigma_vp x0, Salimans & Ho 2022)
"""

from __future__ import annotations

import torch

from t2i.errors import ConfigError

PREDICTIONS = ("eps", "v", "x0")
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
_SPELLINGS = {
    **{name: name for name in PREDICTIONS},
    **{theirs: ours for ours, theirs in DIFFUSERS_PREDICTION.items()},
    "original_sample": "x0",
    "noise": "eps",
    "x_start": "x0",
}


def normalize_prediction(name: str, key: str = "model.parameterization") -> str:
    """Any accepted spelling -> `eps | v | x0`; ConfigError naming `key` otherwise."""
    if name not in _SPELLINGS:
        raise ConfigError(
            f"{key}: {name!r} is not one of {', '.join(PREDICTIONS)} "
            f"(or {', '.join(s for s in _SPELLINGS if s not in PREDICTIONS)})"
        )
    return _SPELLINGS[name]


def x0_from_output(out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction: str) -> torch.Tensor:
    """The network output as x0 on the VE scale; x (VE scale) and sigma broadcastable to it."""
    if prediction == "eps":
        return x - sigma * out
    if prediction == "v":
        return x / (sigma**2 + 1) - out * sigma / (sigma**2 + 1).sqrt()
    return out


def output_from_x0(x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction: str) -> torch.Tensor:
    """Inverse of `x0_from_output`: the network output that gives `x0` at (x, sigma) on the VE scale."""
    if prediction == "eps":
        return (x - x0) / sigma
    if prediction == "v":
        return (x / (sigma**2 + 1) - x0) * (sigma**2 + 1).sqrt() / sigma
    return x0


def regression_target(
    prediction: str, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma_vp: torch.Tensor
) -> torch.Tensor:
    """What the network regresses onto for z = alpha x0 + sigma_vp noise: the noise, v or x0.

    alpha and sigma_vp broadcast to x0 (alpha^2 + sigma_vp^2 = 1)."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        return alpha * noise - sigma_vp * x0
    return x0
