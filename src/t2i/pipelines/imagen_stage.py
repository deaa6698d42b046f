"""One Imagen cascade stage: the backbone, its preconditioning, text and low-res conditioning, and its folder.

Shared by the training task (`t2i.train.tasks.imagen`) and the cascade pipeline (`t2i.pipelines.cascade`).
A stage is the `model:` section of a run config (`model.kind: imagen`) plus UNet weights:

- `unet_type: base` generates at `unet.image_size` from text; `sr-unet` / `sr` also take the previous stage's
  image (`x_low_res`, `conditioning.low_res_size` pixels, default image_size // 4), and with
  `unet.noise_cond_aug` the noise level of its augmentation (`aug_cond`).
- `preconditioning_type: EDM` wraps the backbone with Karras et al.'s preconditioning (`EDMDenoiser`);
  `DDPM` with the continuous-time DDPM adapter (`ContinuousDDPMDenoiser`). Either way samplers see the
  denoiser contract `D(x, sigma, cond) -> x0`.
- Text: per-token embeddings (B, T, D) + mask, padded or trimmed to `conditioning.token_length`. The
  unconditional branch of classifier-free guidance is all zeros, embedding and mask alike (what training's
  `drop_rate` produces).

Stage folder (what `ImagenTask.export` writes and `load_stage` reads): `model.safetensors` (backbone weights),
`config.yaml` (the resolved run config) and `stage.json` (format tag, text-encoder reference, sampling defaults).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from t2i.atomic import output_folder
from t2i.config import EDMConfig, ImagenConfig
from t2i.diffusion.denoisers import ContinuousDDPMDenoiser, EDMDenoiser
from t2i.diffusion.schedules import LogSNRSchedule, continuous_sigmas, edm_sigmas
from t2i.errors import ConfigError, PipelineLoadError
from t2i.text.conditioner import TextEmbedder

STAGE_FORMAT = "t2i-imagen-stage"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
STAGE_NAME = "stage.json"
DEFAULT_SAMPLERS = {"EDM": "heun", "DDPM": "ddpm_continuous"}
# Sampler names that earlier t2i versions wrote into stage.json (EDM's Heun is the Heun sampler).
LEGACY_SAMPLERS = {"edm_heun": "heun"}


# ------------------------------------------------------------------------------------------------ settings


def stage_config(model_config: Any) -> ImagenConfig:
    """A stage's `model:` section (an ImagenConfig, or a plain dict read from a stage folder) as an ImagenConfig."""
    if isinstance(model_config, ImagenConfig):
        return model_config
    from t2i.config import build_config

    model = build_config({"model": dict(model_config)}).model
    if not isinstance(model, ImagenConfig):
        raise ConfigError(f"model.kind: {model.kind!r}; an Imagen stage needs imagen")
    return model


def unet_kwargs(cfg: ImagenConfig) -> dict[str, Any]:
    """`model.unet` as the backbone's keyword arguments (null `low_res_cond`: the unet_type's default)."""
    kwargs = {k: v for k, v in asdict(cfg.unet).items() if k != "kind"}
    if kwargs.get("low_res_cond") is None:
        kwargs.pop("low_res_cond", None)
    return kwargs


# ------------------------------------------------------------------------------------------------ stage


class ImagenNet(nn.Module):
    """The backbone under the denoiser contract's cond names: context -> text_embed, context_mask -> text_mask.

    forward(x (B, C, H, W), time_cond (B,), context (B, T, D), context_mask (B, T) bool, x_low_res, aug_cond).
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        x: torch.Tensor,
        time_cond: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        x_low_res: torch.Tensor | None = None,
        aug_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.unet(x, time_cond, context, context_mask, x_low_res, aug_cond)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size): area filter when shrinking (antialiased), bicubic when growing."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    if size < images.shape[-1]:
        return F.interpolate(images.float(), size=(size, size), mode="area")
    return F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)


class ImagenStage(nn.Module):
    """A stage's backbone with its config; builds denoisers, sigmas and the conditioning dicts.

    Args:
        model_config: the `model:` section (ImagenConfig or dict).
        unet: the backbone (built from `model.unet` when None).
    """

    def __init__(self, model_config: Any, unet: nn.Module | None = None) -> None:
        super().__init__()
        from t2i.models.imagen_unet import build_imagen_unet

        self.settings = stage_config(model_config)
        self.unet = unet if unet is not None else build_imagen_unet(self.settings.unet_type, unet_kwargs(self.settings))

    @property
    def model_config(self) -> dict[str, Any]:
        return asdict(self.settings)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def denoiser(self, net: nn.Module | None = None) -> nn.Module:
        """D(x, sigma, cond) -> x0 around `net` (default: this stage's backbone) for the preconditioning."""
        net = ImagenNet(self.unet if net is None else net)
        p = self.settings.preconditioning
        if isinstance(p, EDMConfig):
            return EDMDenoiser(net, sigma_data=p.sigma_data, sigma_min=p.sigma_min, sigma_max=p.sigma_max)
        return ContinuousDDPMDenoiser(net, LogSNRSchedule(p.noise_schedule), p.pred_objective)

    def sigmas(self, steps: int) -> torch.Tensor:
        """(steps + 1,) decreasing noise levels ending at 0 for this stage's preconditioning."""
        p = self.settings.preconditioning
        if isinstance(p, EDMConfig):
            return edm_sigmas(steps, p.sigma_min, p.sigma_max, p.rho)
        return continuous_sigmas(steps, LogSNRSchedule(p.noise_schedule))

    def text_embedder(self, encoder: Any, drop_rate: float = 0.0) -> TextEmbedder:
        """The stage's text conditioning: per-token embeddings and mask at `token_length`, zeros when dropped."""
        c = self.settings.conditioning
        return TextEmbedder(
            encoder, drop_rate=drop_rate, null="zeros", masked=True, precached_key=c.precached_key or "embeddings",
            token_length=c.token_length, dim=c.embed_dim, dim_key="model.conditioning.embed_dim",
        )  # fmt: skip

    def low_res_cond(
        self, low_res: torch.Tensor, level: float | None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Sampling-time low-res conditioning: the previous stage's images (B, C, h, w) in [-1, 1], resized to
        `low_res_size`, augmented at the fixed `level` (sigma_aug under EDM, time under DDPM).

        A stage trained without noise-conditioning augmentation saw the plain low-res images (no noise, no
        c_in scaling), so it gets them here too and `level` does not apply: c_in(0.002) alone would double them.
        """
        from t2i.diffusion.noise_aug import fixed_augment

        low_res = resize_images(low_res.to(self.device), self.settings.low_res_size).clamp(-1, 1)
        level = default_aug_level(self.settings) if level is None else level
        return self.augmented(low_res, lambda x: fixed_augment(x, level, generator=generator, **self.aug_options()))

    def augmented(self, low_res: torch.Tensor, augment: Any) -> dict[str, torch.Tensor]:
        """{x_low_res (+ aug_cond)}: `augment(low_res) -> (x_aug, aug_cond)` applied when the stage trains with
        noise-conditioning augmentation, the plain low-res images otherwise."""
        if not self.settings.augments_low_res:
            return {"x_low_res": low_res}
        x_aug, aug_cond = augment(low_res)
        cond = {"x_low_res": x_aug}
        if self.settings.unet.noise_cond_aug:
            cond["aug_cond"] = aug_cond
        return cond

    def aug_options(self) -> dict[str, Any]:
        """Keyword options of the noise-augmentation functions for this preconditioning."""
        p = self.settings.preconditioning
        if isinstance(p, EDMConfig):
            return {"kind": "EDM", "sigma_data": p.sigma_data}
        return {"kind": "DDPM", "noise_schedule": LogSNRSchedule(p.noise_schedule)}


def default_aug_level(settings: ImagenConfig) -> float:
    """The sampling-time augmentation level when none is given: sigma_aug 0.002 (EDM), t = 0 (DDPM)."""
    return 0.002 if settings.preconditioning_type == "EDM" else 0.0


# ------------------------------------------------------------------------------------------------ folder


@dataclass
class StageDefaults:
    """Sampling defaults stored in stage.json (generate() arguments override them)."""

    sampler: str | None = None
    steps: int = 30
    guidance_scale: float = 4.0
    aug_level: float | None = None
    dynamic_thresholding: float | None = None


def text_encoder_reference(settings: ImagenConfig) -> dict[str, Any]:
    """How to rebuild the stage's text encoder: {kind, path, max_length}."""
    c = settings.conditioning
    return {"kind": c.encoder_kind, "path": c.encoder_path, "max_length": c.token_length}


def save_stage(
    folder: str | Path, unet: nn.Module, run_config: Any, defaults: StageDefaults | None = None
) -> Path:
    """Write a stage folder: model.safetensors, config.yaml (resolved run config), stage.json."""
    from safetensors.torch import save_file

    from t2i.config import to_yaml

    folder = output_folder(folder, "Imagen stage")
    settings = stage_config(run_config.model)
    state = {k: v.detach().float().cpu().contiguous() for k, v in unet.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(to_yaml(run_config))
    defaults = defaults or StageDefaults()
    meta = {
        "format": STAGE_FORMAT,
        "unet_type": settings.unet_type,
        "image_size": settings.image_size,
        "low_res_size": settings.low_res_size,
        "text_encoder": text_encoder_reference(settings),
        "sampling": asdict(defaults),
    }
    (folder / STAGE_NAME).write_text(json.dumps(meta, indent=2))
    return folder


def load_stage(folder: str | Path, device: str | torch.device = "cpu") -> tuple[ImagenStage, StageDefaults]:
    """Read a stage folder written by `save_stage` (strict weights)."""
    from safetensors.torch import load_file

    from t2i.config import load_config

    folder = Path(folder)
    for name in (WEIGHTS_NAME, CONFIG_NAME, STAGE_NAME):
        if not (folder / name).is_file():
            raise PipelineLoadError(
                f"{folder}: not an Imagen stage folder (no {name}); expected the output of "
                "`t2i train` export for model.kind imagen"
            )
    meta = json.loads((folder / STAGE_NAME).read_text())
    if meta.get("format") != STAGE_FORMAT:
        raise PipelineLoadError(
            f"{folder / STAGE_NAME}: format {meta.get('format')!r}; expected {STAGE_FORMAT}"
        )
    cfg = load_config(folder / CONFIG_NAME)
    if cfg.model.kind != "imagen":
        raise PipelineLoadError(f"{folder / CONFIG_NAME}: model.kind {cfg.model.kind!r}; expected imagen")
    stage = ImagenStage(cfg.model)
    load_unet_strict(stage.unet, load_file(str(folder / WEIGHTS_NAME)), str(folder / WEIGHTS_NAME))
    defaults = StageDefaults(**meta.get("sampling", {}))
    defaults.sampler = LEGACY_SAMPLERS.get(defaults.sampler, defaults.sampler)
    return stage.to(device).eval().requires_grad_(False), defaults


def load_unet_strict(unet: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load backbone weights, raising WeightsMismatchError naming the first missing/unexpected keys."""
    from t2i.errors import WeightsMismatchError

    own = unet.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})"
             for k, v in state.items() if k in own and own[k].shape != v.shape]  # fmt: skip
    if wrong:
        raise WeightsMismatchError(
            f"{source}: Imagen UNet weights do not match model.unet; shapes differ for {wrong[:2]}"
        )
    result = unet.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsMismatchError(
            f"{source}: Imagen UNet weights do not match model.unet; missing "
            f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
