"""The one interface between pixels and model space.

The SD family puts an AutoencoderKL behind it (`LatentFirstStage`); the Imagen family works on pixels
(`IdentityFirstStage`). Trainer, precacher and pipelines only call these methods.
Images are (B, C, H, W) in [-1, 1]; model-space tensors are (B, latent_channels, H/f, W/f), f = downsample_factor.
"""

from __future__ import annotations

import torch
from torch import nn

from t2i.models.autoencoder import AutoencoderKL, DiagonalGaussian


class LatentFirstStage(nn.Module):
    """VAE first stage: z = scale_factor * (sample(q(z|x)) - shift_factor); decode undoes both.

    shift_factor is 0 for the SD family and 0.1159 for the FLUX.1 VAE (diffusers' `(z - shift) * scale`).
    The VAE is frozen here (eval mode, no grads); training the VAE itself uses AutoencoderKL directly.
    """

    def __init__(self, vae: AutoencoderKL, scale_factor: float = 0.18215, shift_factor: float = 0.0):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scale_factor = float(scale_factor)
        self.shift_factor = float(shift_factor)

    @property
    def downsample_factor(self) -> int:
        return self.vae.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.vae.embed_dim

    def train(self, mode: bool = True) -> LatentFirstStage:
        """Keep the frozen VAE in eval mode whatever the parent module asks."""
        super().train(mode)
        self.vae.eval()
        return self

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) in [-1, 1] -> (mean, logvar), each (B, latent_channels, h, w), unscaled."""
        posterior = self.vae.encode(images.to(self.vae_dtype))
        return posterior.mean, posterior.logvar

    def z_from_moments(
        self, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Sample from stored moments, shift and scale: scale_factor * (mean + std * eps - shift_factor)."""
        return latents_from_moments({"mean": mean, "logvar": logvar}, self.scale_factor, self.shift_factor,
                                    generator, mean.device)  # fmt: skip

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images (B, C, H, W) in [-1, 1] -> sampled, scaled latents (B, latent_channels, H/f, W/f)."""
        mean, logvar = self.encode_moments(images)
        return self.z_from_moments(mean, logvar, generator)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, latent_channels, h, w) -> images (B, C, h*f, w*f), roughly in [-1, 1]."""
        return self.vae.decode(z.to(self.vae_dtype) / self.scale_factor + self.shift_factor)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype


class IdentityFirstStage(nn.Module):
    """Pixel-space first stage (Imagen): model space is the image itself.

    encode_moments returns the images as the mean (and a near-zero variance), so precached moments are pixels.
    """

    def __init__(self, channels: int = 3):
        super().__init__()
        self.channels = channels

    @property
    def downsample_factor(self) -> int:
        return 1

    @property
    def latent_channels(self) -> int:
        return self.channels

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, logvar) with logvar at the CompVis floor (-30), i.e. a point mass at the image."""
        return images, torch.full_like(images, -30.0)

    def z_from_moments(
        self, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Pixels carry no posterior noise: return the mean unchanged."""
        return mean

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return images

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


def latents_from_moments(
    moments: dict[str, torch.Tensor], scale_factor: float, shift_factor: float,
    generator: torch.Generator | None, device: torch.device | str,
) -> torch.Tensor:
    """Scaled latents sampled from precached VAE moments (`{"mean", "logvar"}`), without the VAE itself:
    scale_factor * (mean + std * eps - shift_factor)."""
    mean, logvar = moments["mean"].to(device).float(), moments["logvar"].to(device).float()
    return (DiagonalGaussian(mean, logvar).sample(generator) - shift_factor) * scale_factor
