"""Tensor helpers every diffusion module shares: broadcasting per-sample values, the compute dtype, noise."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# One generator for the whole batch, or one per batch row (diffusers' convention), so that a row's noise does not
# depend on which other rows share its batch.
Generators = torch.Generator | Sequence[torch.Generator] | None


def append_dims(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dimensions in all, for broadcasting against x."""
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32: schedule coefficients in half precision lose too much."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def batch_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """sigma as a (B,) tensor on x's device in the compute dtype (a scalar is broadcast over the batch)."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=compute_dtype(x))
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def _generator_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


def randn(
    shape: Sequence[int],
    generator: Generators = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn on the generator's device so seeds reproduce across devices.

    With a list of generators (one per row of the leading dimension) each row comes from its own generator.
    """
    device = torch.device(device)
    if generator is None or isinstance(generator, torch.Generator):
        noise = torch.randn(tuple(shape), generator=generator, device=_generator_device(generator, device),
                            dtype=dtype)  # fmt: skip
        return noise.to(device)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}; expected one per row")
    rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generators]
    return torch.cat([row.to(device) for row in rows])


def noise_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like x (per-row generators allowed, see `randn`)."""
    return randn(x.shape, generator, x.device, x.dtype)
