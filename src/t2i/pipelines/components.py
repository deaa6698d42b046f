"""What every latent pipeline (SD/SDXL UNets, Flux transformers) derives from its backbone and first stage."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


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
