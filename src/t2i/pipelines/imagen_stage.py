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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from t2i.errors import ConfigError, PipelineLoadError

STAGE_FORMAT = "t2i-imagen-stage"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
STAGE_NAME = "stage.json"
DEFAULT_SAMPLERS = {"EDM": "edm_heun", "DDPM": "ddpm_continuous"}


# ------------------------------------------------------------------------------------------------ settings


@dataclass
class ConditioningSettings:
    """`model.conditioning`: text embeddings (and the SR stage's low-res size).

    precached_key: name of the embeddings inside precached shards' `captions_encoded` (falls back to
    `embeddings`); set it (with online_encoding false) to train from precached shards.
    """

    embed_dim: int = 384
    token_length: int = 16
    drop_rate: float = 0.1
    precached_key: str | None = None
    online_encoding: bool | None = None
    encoder_kind: Literal["t5", "clip", "openclip", "minilm"] = "minilm"
    encoder_path: str | None = None
    low_res_size: int | None = None

    def check(self, key: str) -> None:
        _require(self.embed_dim >= 1, f"{key}.embed_dim", self.embed_dim, "an integer >= 1")
        _require(self.token_length >= 1, f"{key}.token_length", self.token_length, "an integer >= 1")
        _require(0 <= self.drop_rate <= 1, f"{key}.drop_rate", self.drop_rate, "a number in [0, 1]")
        if self.online_encoding is False and self.precached_key is None:
            raise ConfigError(
                f"{key}.precached_key: null with online_encoding false; expected the name of the "
                "precached embeddings (e.g. embeddings) or online_encoding: true"
            )

    @property
    def online(self) -> bool:
        """True when captions are encoded on every step (no precached shards)."""
        return self.precached_key is None if self.online_encoding is None else bool(self.online_encoding)


@dataclass
class EDMSettings:
    """`model.preconditioning` under EDM (Karras et al. 2022, Table 1), plus the sampling noise range."""

    loss_type: Literal["l1", "l2", "huber"] = "l2"
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def check(self, key: str) -> None:
        for name in ("sigma_data", "p_std", "sigma_min", "sigma_max", "rho"):
            _require(getattr(self, name) > 0, f"{key}.{name}", getattr(self, name), "a number > 0")


@dataclass
class DDPMSettings:
    """`model.preconditioning` under continuous-time DDPM (NeMo's `ContinousDDPM`)."""

    loss_type: Literal["l1", "l2", "huber"] = "l2"
    pred_objective: Literal["noise", "x_start"] = "noise"
    noise_schedule: Literal["linear", "cosine"] = "cosine"
    timesteps: int = 1000

    def check(self, key: str) -> None:
        _require(self.timesteps >= 1, f"{key}.timesteps", self.timesteps, "an integer >= 1")


@dataclass
class NoiseAugSettings:
    """`model.noise_cond_aug` (SR stages): augmentation of the low-res input during training.

    per_sample: draw one augmentation level per sample (NeMo's default) or one per batch. Under EDM the level
    is sigma_aug from the training log-normal; under DDPM a continuous time in [0, max_level].
    """

    enabled: bool = True
    per_sample: bool = True
    max_level: float = 1.0

    def check(self, key: str) -> None:
        _require(0 < self.max_level <= 1, f"{key}.max_level", self.max_level, "a number in (0, 1]")


@dataclass
class StageSettings:
    """Everything about a stage that is not a weight, parsed and validated from `model:`."""

    unet_type: str
    unet: dict[str, Any]
    preconditioning_type: str
    preconditioning: EDMSettings | DDPMSettings
    conditioning: ConditioningSettings
    noise_aug: NoiseAugSettings = field(default_factory=lambda: NoiseAugSettings(enabled=False))

    @property
    def is_sr(self) -> bool:
        return self.unet_type != "base"

    @property
    def image_size(self) -> int:
        return int(self.unet["image_size"])

    @property
    def low_res_size(self) -> int | None:
        if not self.is_sr:
            return None
        return self.conditioning.low_res_size or self.image_size // 4

    @property
    def aug_cond(self) -> bool:
        """Whether the backbone takes `aug_cond` (the noise level of the low-res augmentation)."""
        return bool(self.unet.get("noise_cond_aug", False))


def parse_stage_settings(model: Any) -> StageSettings:
    """Validate a `model:` section (ImagenConfig or plain dict) into StageSettings; errors name the key."""
    from t2i.config import _to_dataclass  # the schema checker of t2i.config, reused for the nested sections

    m = model if isinstance(model, dict) else asdict(model)
    kind = m.get("preconditioning_type", "EDM")
    if kind not in DEFAULT_SAMPLERS:
        raise ConfigError(f"model.preconditioning_type: {kind!r} is not one of EDM, DDPM")
    schema = EDMSettings if kind == "EDM" else DDPMSettings
    precond = _to_dataclass(schema, dict(m.get("preconditioning") or {}), "model.preconditioning")
    cond = _to_dataclass(ConditioningSettings, dict(m.get("conditioning") or {}), "model.conditioning")
    unet = dict(m.get("unet") or {})
    unet_type = m.get("unet_type", "base")
    settings = StageSettings(
        unet_type, unet, kind, precond, cond, _parse_noise_aug(m.get("noise_cond_aug"), unet)
    )
    _check_consistency(settings)
    return settings


def _parse_noise_aug(raw: Any, unet: dict[str, Any]) -> NoiseAugSettings:
    """`noise_cond_aug`: null (on iff unet.noise_cond_aug), a boolean, or a mapping of NoiseAugSettings keys."""
    from t2i.config import _to_dataclass

    if raw is None:
        return NoiseAugSettings(enabled=bool(unet.get("noise_cond_aug", False)))
    if isinstance(raw, bool):
        return NoiseAugSettings(enabled=raw)
    if isinstance(raw, dict):
        return _to_dataclass(NoiseAugSettings, raw, "model.noise_cond_aug")
    raise ConfigError(f"model.noise_cond_aug: expected null, a boolean or a mapping, got {raw!r}")


def _check_consistency(s: StageSettings) -> None:
    text_dim = s.unet.get("text_embed_dim", 512)
    if text_dim != s.conditioning.embed_dim:
        raise ConfigError(
            f"model.conditioning.embed_dim: {s.conditioning.embed_dim} must equal "
            f"model.unet.text_embed_dim {text_dim}"
        )
    if "image_size" not in s.unet:
        raise ConfigError("model.unet.image_size: missing; every Imagen stage needs its output size")
    if s.noise_aug.enabled and not s.is_sr:
        raise ConfigError(
            "model.noise_cond_aug: only super-resolution stages (unet_type sr-unet | sr) augment "
            "a low-res input; expected null or false for unet_type base"
        )
    if s.is_sr and s.low_res_size >= s.image_size:
        raise ConfigError(
            f"model.conditioning.low_res_size: {s.low_res_size}; expected less than "
            f"model.unet.image_size {s.image_size}"
        )


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


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


def fit_tokens(
    embeddings: torch.Tensor, mask: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (zeros, mask False) or trim (B, T, D) / (B, T) to T = length."""
    tokens = embeddings.shape[1]
    if tokens > length:
        return embeddings[:, :length], mask[:, :length]
    if tokens < length:
        embeddings = F.pad(embeddings, (0, 0, 0, length - tokens))
        mask = F.pad(mask, (0, length - tokens), value=False)
    return embeddings, mask


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size): area filter when shrinking (antialiased), bicubic when growing."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    if size < images.shape[-1]:
        return F.interpolate(images.float(), size=(size, size), mode="area")
    return F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)


class ImagenStage(nn.Module):
    """A stage's backbone with its settings; builds denoisers, sigmas and the conditioning dicts.

    Args:
        model_config: the `model:` section (ImagenConfig or dict).
        unet: the backbone (built from `model.unet` when None).
    """

    def __init__(self, model_config: Any, unet: nn.Module | None = None) -> None:
        super().__init__()
        from t2i.models.imagen_unet import build_imagen_unet

        self.settings = parse_stage_settings(model_config)
        self.model_config = model_config if isinstance(model_config, dict) else asdict(model_config)
        self.unet = (
            unet if unet is not None else build_imagen_unet(self.settings.unet_type, self.settings.unet)
        )

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def denoiser(self, net: nn.Module | None = None) -> nn.Module:
        """D(x, sigma, cond) -> x0 around `net` (default: this stage's backbone) for the preconditioning."""
        net = ImagenNet(self.unet if net is None else net)
        p = self.settings.preconditioning
        if self.settings.preconditioning_type == "EDM":
            from t2i.diffusion.edm import EDMDenoiser

            return EDMDenoiser(net, sigma_data=p.sigma_data, sigma_min=p.sigma_min, sigma_max=p.sigma_max)
        from t2i.diffusion.continuous import ContinuousDDPMDenoiser

        return ContinuousDDPMDenoiser(net, noise_schedule=p.noise_schedule, pred_objective=p.pred_objective)

    def sigmas(self, steps: int) -> torch.Tensor:
        """(steps + 1,) decreasing noise levels ending at 0 for this stage's preconditioning."""
        p = self.settings.preconditioning
        if self.settings.preconditioning_type == "EDM":
            from t2i.diffusion.edm import edm_sigmas

            return edm_sigmas(steps, p.sigma_min, p.sigma_max, p.rho)
        from t2i.diffusion.continuous import continuous_sigmas

        return continuous_sigmas(steps, noise_schedule=p.noise_schedule)

    def text_cond(self, embeddings: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """{context (B, token_length, D), context_mask (B, token_length) bool} on the stage's device."""
        dim = self.settings.conditioning.embed_dim
        if embeddings.shape[-1] != dim:
            raise ConfigError(
                f"model.conditioning.embed_dim: {dim}, but the text embeddings have width "
                f"{embeddings.shape[-1]}; expected the encoder the stage was trained with"
            )
        embeddings, mask = fit_tokens(
            embeddings.float(), mask.bool(), self.settings.conditioning.token_length
        )
        return {"context": embeddings.to(self.device), "context_mask": mask.to(self.device)}

    def low_res_cond(
        self, low_res: torch.Tensor, level: float | None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Sampling-time low-res conditioning: the previous stage's images (B, C, h, w) in [-1, 1], resized to
        `low_res_size`, augmented at the fixed `level` (sigma_aug under EDM, time under DDPM).

        A stage trained without noise-conditioning augmentation saw the plain low-res images (no noise, no
        c_in scaling), so it gets them here too and `level` does not apply: c_in(0.002) alone would double them.
        """
        from t2i.diffusion.noise_aug import fixed_augment

        s = self.settings
        low_res = resize_images(low_res.to(self.device), s.low_res_size).clamp(-1, 1)
        if not s.noise_aug.enabled:
            return {"x_low_res": low_res}
        level = default_aug_level(s) if level is None else level
        x_aug, aug_cond = fixed_augment(low_res, level, generator=generator, **self.aug_options())
        cond = {"x_low_res": x_aug}
        if s.aug_cond:
            cond["aug_cond"] = aug_cond
        return cond

    def aug_options(self) -> dict[str, Any]:
        """Keyword options of the noise-augmentation functions for this preconditioning."""
        p = self.settings.preconditioning
        if self.settings.preconditioning_type == "EDM":
            return {"kind": "EDM", "sigma_data": p.sigma_data}
        return {"kind": "DDPM", "noise_schedule": p.noise_schedule}


def default_aug_level(settings: StageSettings) -> float:
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


def text_encoder_reference(settings: StageSettings) -> dict[str, Any]:
    """How to rebuild the stage's text encoder: {kind, path, max_length}."""
    c = settings.conditioning
    return {"kind": c.encoder_kind, "path": c.encoder_path, "max_length": c.token_length}


def save_stage(
    folder: str | Path, unet: nn.Module, run_config: Any, defaults: StageDefaults | None = None
) -> Path:
    """Write a stage folder: model.safetensors, config.yaml (resolved run config), stage.json."""
    from safetensors.torch import save_file

    from t2i.config import to_yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = parse_stage_settings(run_config.model)
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
