"""AutoencoderKL training task: the first-stage VAE trained (or fine-tuned) on images alone.

Loss (CompVis `LPIPSWithDiscriminator` without its perceptual and adversarial terms, divided by the number of
pixel values so it reads as a per-pixel error):

    loss = mean |x - x_rec|  (or squared, `pixel_loss: l2`)  +  kl_weight * KL(q(z|x) || N(0, I)) / (C * H * W)

with KL summed over the latent and averaged over the batch, so `kl_weight` means what it means in CompVis
configs (1e-6 for the SD VAE). The reconstruction is decoded from a sampled latent, as in training the SD VAE.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from t2i.config import AutoencoderConfig, RunConfig
from t2i.errors import ConfigError
from t2i.train.task import DiffusionTask, register_task
from t2i.train.tasks import ObservedLoader


def build_autoencoder(m: AutoencoderConfig) -> nn.Module:
    """AutoencoderKL from `ddconfig`, or loaded from `from_pretrained` (a VAE or pipeline folder)."""
    from t2i.convert.vae_diffusers import load_vae
    from t2i.models.autoencoder import AutoencoderKL

    if m.from_pretrained is not None:
        return load_vae(m.from_pretrained)
    return AutoencoderKL(m.embed_dim, dataclasses.asdict(m.ddconfig))


def _check_loss(m: AutoencoderConfig) -> None:
    for name in ("perceptual_weight", "disc_weight"):
        value = getattr(m.loss, name)
        if value:
            raise ConfigError(f"model.loss.{name}: {value} is not supported by the autoencoder task; expected 0")
    if m.loss.kl_weight < 0:
        raise ConfigError(f"model.loss.kl_weight: expected a number >= 0, got {m.loss.kl_weight}")


def reconstruction_loss(x: torch.Tensor, reconstruction: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean per-pixel L1 or L2 error between images (B, C, H, W), in float32."""
    if kind == "l2":
        return F.mse_loss(reconstruction.float(), x.float())
    return F.l1_loss(reconstruction.float(), x.float())


class AutoencoderTask(DiffusionTask):
    """Trains `self.vae`; batches are `{"images": (B, 3, H, W) in [-1, 1], ...}` (captions ignored).

    `sample_images` returns reconstructions of the first images the loop trained on (prompts only set how many),
    so the progress grid shows how faithful the autoencoder has become.
    """

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        _check_loss(cfg.model)
        self.cfg = cfg
        self.vae = build_autoencoder(cfg.model)
        factor, resolution = self.vae.downsample_factor, cfg.data.resolution
        if resolution % factor:
            raise ConfigError(f"data.resolution: {resolution} is not a multiple of {factor} (the VAE's downsampling); "
                              f"use {max(factor, resolution // factor * factor)} or {(resolution // factor + 1) * factor}")
        self._data: ObservedLoader | None = None
        self._probe: torch.Tensor | None = None  # first images seen, for reconstruction grids

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def build_dataloader(self, cfg: RunConfig, rank: int, world_size: int) -> ObservedLoader:
        from t2i.data.readers import build_dataset

        d = cfg.data
        dataset = build_dataset(d.train, d.resolution, d.center_crop, d.random_flip, caption_keys=d.caption_key,
                                max_image_pixels=d.max_image_pixels, seed=cfg.seed, rank=rank,
                                world_size=world_size, shuffle_buffer=d.shuffle_buffer, repeat=True,
                                cache_in_memory=d.cache_in_memory)
        self._data = ObservedLoader(dataset, d.batch_size, d.num_workers, cfg.seed)
        return self._data

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach() for name, t in self.vae.state_dict().items()}

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from t2i.models.autoencoder import load_state_dict_strict

        load_state_dict_strict(self.vae, dict(state), "autoencoder state")

    def compile_targets(self) -> list[nn.Module]:
        return [self.vae]

    def data_stats(self) -> dict[str, int | float]:
        return self._data.data_stats() if self._data is not None else {}

    def training_loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """Reconstruction + weighted KL of one batch (see the module docstring)."""
        x = batch["images"].to(self.device)
        if self._probe is None:
            self._probe = x[:16].detach().cpu().clone()
        if self.cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        reconstruction, posterior = self.vae(x, sample_posterior=True, generator=generator)
        loss = reconstruction_loss(x, reconstruction, self.cfg.model.loss.pixel_loss)
        kl = posterior.kl().float().mean() / x[0].numel()
        return loss + self.cfg.model.loss.kl_weight * kl

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> reconstructions through the posterior mean, same shape."""
        return self.vae.decode(self.vae.encode(images.to(self.device)).mode()).float().clamp(-1, 1)

    @torch.no_grad()
    def sample_images(self, prompts: list[str], seed: int) -> list[Any]:
        from t2i.data.transforms import to_pil

        if self._probe is None:
            return []
        return to_pil(self.reconstruct(self._probe[: max(len(prompts), 1)]))

    def export(self, out_dir: str | Path, use_ema: bool = True) -> Path:
        """Write a diffusers-format VAE folder (config.json + diffusion_pytorch_model.safetensors).

        Both `t2i.convert.vae_diffusers.load_vae` and diffusers' `AutoencoderKL.from_pretrained` read it.
        """
        from t2i.convert.vae_diffusers import save_diffusers_vae

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with self.ema_weights(use_ema):
            save_diffusers_vae(self.vae, str(out))
        return out


@register_task("autoencoder")
def build_autoencoder_task(cfg: RunConfig) -> AutoencoderTask:
    """Factory registered for `model.kind: autoencoder`."""
    return AutoencoderTask(cfg)
