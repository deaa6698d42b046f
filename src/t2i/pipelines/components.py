"""What every latent pipeline (SD/SDXL UNets, Flux transformers) derives from its backbone and first stage."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from t2i.diffusion.tensors import Generators, randn
from t2i.errors import InvalidInputError


class BackboneAndFirstStage:
    """Device, dtype, the VAE and its latent scale, and freezing, for a pipeline with a `backbone` network, a
    `first_stage` (a `LatentFirstStage`) and `text_modules()`."""

    backbone: nn.Module
    first_stage: Any

    def text_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def freeze(self) -> Any:
        """Eval mode and no gradients for every component (what a loaded pipeline is)."""
        for module in (self.backbone, self.first_stage, *self.text_modules()):
            module.eval().requires_grad_(False)
        return self

    @property
    def vae(self) -> nn.Module:
        return self.first_stage.vae

    @property
    def scale_factor(self) -> float:
        return self.first_stage.scale_factor

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def latent_shape(self, rows: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(rows, latent channels, h, w) of images `height` x `width`."""
        f = self.first_stage.downsample_factor
        return rows, self.first_stage.latent_channels, height // f, width // f

    @staticmethod
    def initial_noise(
        latents: torch.Tensor | None, shape: tuple[int, ...], generator: Generators, what: str = ""
    ) -> torch.Tensor:
        """Unit-variance initial noise of `shape`: the caller's `latents` (checked) or drawn from `generator`."""
        if latents is None:
            return randn(shape, generator)
        if tuple(latents.shape) != shape:
            raise InvalidInputError(f"latents: shape {tuple(latents.shape)}; expected {shape}{what}")
        return latents
