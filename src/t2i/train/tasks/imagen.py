"""Imagen training task (`model.kind: imagen`): one cascade stage in pixel space, base or super-resolution.

Data paths, chosen by `model.conditioning`:
- online (`online_encoding: true`, no `precached_key`): image shards; captions run through the frozen text
  encoder (`encoder_kind`, `encoder_path`) on every step;
- precached (`precached_key` set, `online_encoding` false/null): shards written by `imagen_precache` hold the
  pixels (`image_encoded.mean`, the identity first stage's moments) and the token embeddings + mask.
Images are resized to `unet.image_size` (area filter); an SR stage's low-res input is the same image shrunk to
`conditioning.low_res_size` with the area filter, then noise-augmented (NeMo's noise conditioning augmentation):
under EDM a level sigma_aug from the training log-normal per sample (or per batch), x_low = c_in(sigma_aug) *
(x_low + sigma_aug * n) and aug_cond = ln(sigma_aug) / 4; under DDPM a continuous time t_aug.

Classifier-free guidance: with probability `drop_rate` a sample's text embedding AND mask are zeroed, which is
exactly the unconditional branch the cascade pipeline uses at sampling.

Fine-tuning: `model.from_pretrained` (an exported stage folder, or a run folder holding one under `export/`)
initialises the UNet, whose architecture keys must match it (a mismatch names the keys). With `model.lora` as
well, the UNet stays frozen and only LoRA adapters train (`target_modules`: `attention` by default, `ff`,
`conv`); checkpoints and the EMA hold the adapters alone, and `export` writes `lora.safetensors` for
`t2i.lora.load_lora(cascade, path)` or `t2i sample --model CASCADE --lora PATH`. `model.lora.prior` adds prior
preservation on a base stage: class images drawn once by the frozen stage, with DreamBooth's loss (`diffusion`)
or, under EDM, `distill` (lambda(sigma) x the distance to the frozen stage's denoised output).

Training optimisations are config flags: `trainer.precision: bf16`, `model.unet.gradient_checkpointing`,
`model.unet.flash_attention`, `model.channels_last`, `model.inductor` (torch.compile of the backbone).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.config import RunConfig
from t2i.errors import ConfigError
from t2i.pipelines.imagen_stage import (
    DEFAULT_SAMPLERS,
    ImagenStage,
    StageDefaults,
    resize_images,
    save_stage,
)
from t2i.train.task import DiffusionTask, register_task
from t2i.train.tasks import ObservedLoader


class ImagenTask(DiffusionTask):
    """One Imagen stage trained with EDM or continuous-DDPM preconditioning.

    Batches: `{"images" (B, 3, H, W) in [-1, 1], "captions": list[str]}` online, or
    `{"image_encoded": {"mean" (B, 3, H, W), ...}, "captions_encoded": {"embeddings" (B, T, D), "mask" (B, T)}}`
    precached. `defaults` are the sampling settings used by `sample_images` and written into the export.
    """

    def __init__(self, cfg: RunConfig, defaults: StageDefaults | None = None) -> None:
        super().__init__()
        if cfg.model.kind != "imagen":
            raise ConfigError(f"model.kind: {cfg.model.kind!r}; ImagenTask needs imagen")
        self.cfg = cfg
        self.stage = ImagenStage(cfg.model)
        self.settings = self.stage.settings
        self.defaults = defaults or StageDefaults(
            sampler=DEFAULT_SAMPLERS[self.settings.preconditioning_type]
        )
        self.loss_fn = build_loss(self.stage)
        if cfg.model.from_pretrained is not None:
            load_pretrained_stage_weights(self.unet, cfg.model.from_pretrained)
        self.lora_targets = attach_lora(self.unet, cfg.model) if cfg.model.lora is not None else None
        self.prior = prior_settings(cfg, self.settings)
        self.class_images: torch.Tensor | None = None
        self.class_cond: dict[str, torch.Tensor] = {}
        self.online = self.settings.conditioning.online
        self._lazy: dict[str, nn.Module] = {}
        if self.online:
            self.text_encoder = self._build_text_encoder()
        self._data: ObservedLoader | None = None
        self._preview: dict[str, torch.Tensor] = {}  # low-res images of a training batch, for SR previews

    @property
    def unet(self) -> nn.Module:
        return self.stage.unet

    @property
    def device(self) -> torch.device:
        return self.stage.device

    def _build_text_encoder(self) -> nn.Module:
        from t2i.text.encoders import build_text_encoder

        c = self.settings.conditioning
        encoder = build_text_encoder(c.encoder_kind, c.encoder_path, max_length=c.token_length)
        if encoder.dim != c.embed_dim:
            raise ConfigError(
                f"model.conditioning.embed_dim: {c.embed_dim}, but the {c.encoder_kind} encoder "
                f"gives {encoder.dim}-d embeddings"
            )
        return encoder

    def frozen_text_encoder(self) -> nn.Module:
        """The text encoder (built on first use when training from precached shards)."""
        if self.online:
            return self.text_encoder
        if "text_encoder" not in self._lazy:
            self._lazy["text_encoder"] = self._build_text_encoder().to(self.device)
        return self._lazy["text_encoder"]

    # ------------------------------------------------------------------------------------ the loop's API

    def build_dataloader(self, cfg: RunConfig, rank: int, world_size: int) -> ObservedLoader:
        """Endless batches of this rank's share of `data.train` (image shards or precached shards)."""
        d = cfg.data
        common = {
            "seed": cfg.seed,
            "rank": rank,
            "world_size": world_size,
            "shuffle_buffer": d.shuffle_buffer,
            "repeat": True,
        }
        if self.online:
            from t2i.data.readers import build_dataset

            dataset = build_dataset(d.train, d.resolution, d.center_crop, d.random_flip, **common)
        else:
            from t2i.data.precached import build_precached_dataset

            dataset = build_precached_dataset(d.train, **common)
        self._data = ObservedLoader(dataset, d.batch_size, d.num_workers, cfg.seed)
        if self.prior is not None and self.class_images is None:
            self.make_class_images()
        return self._data

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The UNet's weights, or only its LoRA weights when adapters are trained."""
        if self.lora_targets is not None:
            from t2i.lora.peft_lora import is_lora_parameter

            return {n: p.detach() for n, p in _uncompiled(self.unet).named_parameters() if is_lora_parameter(n)}
        return {name: t.detach() for name, t in _uncompiled(self.unet).state_dict().items()}

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.lora_targets is not None:
            super().load_model_state_dict(state)
            return
        from t2i.pipelines.imagen_stage import load_unet_strict

        load_unet_strict(_uncompiled(self.unet), dict(state), "UNet state")

    def compile_targets(self) -> list[nn.Module]:
        return [self.unet]

    def data_stats(self) -> dict[str, int | float]:
        return self._data.data_stats() if self._data is not None else {}

    # ------------------------------------------------------------------------------------ loss

    def images_and_text(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] at their stored size, embeddings (B, T, D), mask (B, T) bool."""
        device = self.device
        if self.online:
            images = batch["images"].to(device).float()
            text = self.text_encoder.encode(list(batch["captions"]))
            return images, text.embeddings.to(device).float(), text.mask.to(device)
        images = batch["image_encoded"]["mean"].to(device).float()
        encoded = batch["captions_encoded"]
        embeddings = encoded.get(self.settings.conditioning.precached_key, encoded["embeddings"])
        return images, embeddings.to(device).float(), encoded["mask"].to(device).bool()

    def drop_text(self, cond: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Zero each sample's embedding and mask with probability `drop_rate` (CFG training)."""
        rate = self.settings.conditioning.drop_rate
        if rate <= 0:
            return cond
        keep = torch.rand(cond["context"].shape[0], generator=generator, device=generator.device) >= rate
        keep = keep.to(cond["context"].device)
        return cond | {
            "context": cond["context"] * keep.to(cond["context"].dtype).view(-1, 1, 1),
            "context_mask": cond["context_mask"] & keep.view(-1, 1),
        }

    def low_res_training_cond(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """The SR stage's conditioning from full-size training images: shrink, then noise-augment."""
        s = self.settings
        low_res = resize_images(images, s.low_res_size)
        self._preview = {"low_res": low_res[:8].detach()}
        if not s.noise_aug.enabled:
            return {"x_low_res": low_res}
        from t2i.diffusion.noise_aug import augment_low_res

        x_aug, aug_cond = augment_low_res(
            low_res, generator=generator, per_sample=s.noise_aug.per_sample, **self.train_aug_options()
        )
        cond = {"x_low_res": x_aug}
        if s.aug_cond:
            cond["aug_cond"] = aug_cond
        return cond

    def train_aug_options(self) -> dict[str, Any]:
        """How training draws the augmentation level: EDM's log-normal, or t in [0, max_level] under DDPM."""
        p = self.settings.preconditioning
        options = self.stage.aug_options()
        if self.settings.preconditioning_type == "EDM":
            return options | {"p_mean": p.p_mean, "p_std": p.p_std}
        return options | {"max_level": self.settings.noise_aug.max_level}

    def training_loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """Scalar loss of one batch; randomness order: text drop, low-res augmentation, noise level + noise."""
        images, embeddings, mask = self.images_and_text(batch)
        x0 = resize_images(images, self.settings.image_size)
        cond = self.drop_text(self.stage.text_cond(embeddings, mask), generator)
        if self.settings.is_sr:
            cond |= self.low_res_training_cond(images, generator)
        if self.cfg.model.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        loss = self.loss_fn(self.loss_model(), x0, cond, generator)
        if self.prior is not None and self.class_images is not None:
            loss = loss + self.prior.weight * self.prior_loss(x0.shape[0], generator)
        return loss

    # ------------------------------------------------------------------------------------ prior preservation

    @torch.no_grad()
    def make_class_images(self) -> None:
        """Draw the class images (B, 3, H, W) in [-1, 1] and their text conditioning with the frozen stage."""
        from t2i.lora.peft_lora import adapters_disabled
        from t2i.pipelines.cascade import CascadePipeline

        prior, encoder = self.prior, self.frozen_text_encoder()
        defaults = StageDefaults(self.defaults.sampler, prior.steps, prior.guidance_scale)
        pipe = CascadePipeline([self.stage], [defaults], [encoder])
        was_training = self.unet.training
        self.unet.eval()
        with adapters_disabled(self.unet):
            out = pipe.generate(list(prior.class_prompts), num_images=prior.num_images, seed=prior.seed)
        self.unet.train(was_training)
        self.class_images = (out.pixels.to(self.device) * 2 - 1).float()
        text = encoder.encode([p for p in prior.class_prompts for _ in range(prior.num_images)])
        self.class_cond = self.stage.text_cond(text.embeddings.to(self.device), text.mask.to(self.device))

    def prior_loss(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """The prior-preservation loss on `batch_size` class images drawn at random."""
        index = torch.randint(
            len(self.class_images), (batch_size,), generator=generator, device=generator.device
        ).to(self.device)
        x0, cond = self.class_images[index], {k: v[index] for k, v in self.class_cond.items()}
        unconditional = self.prior.unconditional_count(batch_size)
        if unconditional:  # the CFG branch: all-zero text and mask, as drop_text makes it
            keep = (torch.arange(batch_size, device=x0.device) >= unconditional)
            cond = cond | {"context": cond["context"] * keep.to(cond["context"].dtype).view(-1, 1, 1),
                           "context_mask": cond["context_mask"] & keep.view(-1, 1)}  # fmt: skip
        if self.prior.loss == "diffusion":
            return self.loss_fn(self.loss_model(), x0, cond, generator)
        return self.distill_loss(x0, cond, generator)

    def distill_loss(
        self, x0: torch.Tensor, cond: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """EDM's lambda(sigma) x ||D_lora(x0 + sigma n) - D_base(x0 + sigma n)||^2, sigma as in training."""
        from t2i.diffusion.edm import append_dims, noise_like, sample_lognormal_sigmas
        from t2i.lora.peft_lora import adapters_disabled

        p, edm = self.settings.preconditioning, self.loss_fn.fn
        sigma = sample_lognormal_sigmas(x0.shape[0], p.p_mean, p.p_std, generator, x0.device)
        x_noisy = x0 + append_dims(sigma, x0.ndim) * noise_like(x0, generator)
        denoiser = self.stage.denoiser()
        with torch.no_grad(), adapters_disabled(self.unet):
            target = denoiser(x_noisy, sigma, cond)
        error = (denoiser(x_noisy, sigma, cond).float() - target.float()) ** 2
        return (append_dims(edm.weight(sigma), x0.ndim) * error).mean()

    def loss_model(self) -> nn.Module:
        """What the loss calls: the EDM-preconditioned denoiser, or the raw backbone under continuous DDPM."""
        if self.settings.preconditioning_type == "EDM":
            return self.stage.denoiser()
        from t2i.pipelines.imagen_stage import ImagenNet

        return ImagenNet(self.unet)

    # ------------------------------------------------------------------------------------ sampling, export

    @torch.no_grad()
    def sample_images(
        self, prompts: list[str], seed: int, steps: int | None = None, guidance_scale: float | None = None
    ) -> list[Any]:
        """One PIL image per prompt. An SR stage upsamples low-res images of a recent training batch (cycled),
        since it has no base stage of its own."""
        from t2i.pipelines.cascade import CascadePipeline

        low_res = None
        if self.settings.is_sr:
            if "low_res" not in self._preview:
                raise ConfigError(
                    "trainer.sample_every: an SR stage previews after its first training batch; "
                    "expected sample_every > 0 steps"
                )
            bank = self._preview["low_res"]
            low_res = bank[torch.arange(len(prompts)) % bank.shape[0]]
        pipe = CascadePipeline([self.stage], [self.defaults], [self.frozen_text_encoder()])
        return pipe.generate(
            list(prompts), seed=seed, steps=steps, guidance_scale=guidance_scale, low_res=low_res
        ).images

    def export(self, out_dir: str | Path, use_ema: bool = True) -> Path:
        """Write an Imagen stage folder (model.safetensors, config.yaml, stage.json) with the (EMA) weights, or
        `out_dir/lora.safetensors` when LoRA adapters were trained."""
        if self.lora_targets is not None:
            return self.export_lora(Path(out_dir), use_ema)
        with self.ema_weights(use_ema):
            unet = copy.deepcopy(_uncompiled(self.unet)).float().cpu()
        return save_stage(out_dir, unet, self.cfg, self.defaults)

    def export_lora(self, out_dir: Path, use_ema: bool) -> Path:
        from t2i.lora.files import save_lora_file

        lora = self.cfg.model.lora
        meta = {"rank": lora.rank, "alpha": lora.alpha, "targets": lora.target_modules,
                "base": str(self.cfg.model.from_pretrained), "unet_type": self.settings.unet_type,
                "image_size": self.settings.image_size}  # fmt: skip
        with self.ema_weights(use_ema):
            return save_lora_file({"unet": _uncompiled(self.unet)}, out_dir / "lora.safetensors", metadata=meta)


def prior_settings(cfg: RunConfig, settings: Any) -> Any:
    """`model.lora.prior` as the task's PriorPreservation, or None; base stages only, `distill` under EDM only."""
    lora = cfg.model.lora
    if lora is None or lora.prior is None:
        return None
    from t2i.train.tasks.lora import PriorPreservation

    if settings.is_sr:
        raise ConfigError(
            "model.lora.prior: base stages only (an SR stage's class images would need low-res inputs); "
            "set prior: null for this stage"
        )
    if lora.prior.loss == "distill" and settings.preconditioning_type != "EDM":
        raise ConfigError(
            "model.lora.prior.loss: distill needs preconditioning_type EDM; use diffusion under DDPM"
        )
    return PriorPreservation.from_config(lora.prior, cfg.seed)


def stage_folder(path: str | Path) -> Path:
    """A stage folder, or a run folder's exported stage (`export/`)."""
    from t2i.pipelines.imagen_stage import WEIGHTS_NAME

    path = Path(path)
    if path.is_dir() and not (path / WEIGHTS_NAME).is_file() and (path / "export" / WEIGHTS_NAME).is_file():
        return path / "export"
    return path


def load_pretrained_stage_weights(unet: nn.Module, source: str | Path) -> None:
    """Initialise `unet` from the stage folder `source` (strict: the architecture must be the same)."""
    from safetensors.torch import load_file

    from t2i.pipelines.imagen_stage import WEIGHTS_NAME, load_unet_strict

    weights = stage_folder(source) / WEIGHTS_NAME
    if not weights.is_file():
        raise ConfigError(
            f"model.from_pretrained: {source} has no {WEIGHTS_NAME}; expected an exported Imagen stage folder "
            "(or a run folder with one under export/)"
        )
    load_unet_strict(unet, load_file(str(weights)), f"model.from_pretrained ({weights})")


def attach_lora(unet: nn.Module, model: Any) -> list[str]:
    """Freeze `unet` and give it trainable adapters per `model.lora`; needs `model.from_pretrained`."""
    from t2i.lora.peft_lora import apply_lora

    if model.from_pretrained is None:
        raise ConfigError(
            "model.from_pretrained: missing; LoRA training needs the base stage (an exported Imagen stage "
            "folder or a t2i run folder)"
        )
    lora = model.lora
    if lora.train_text_encoder:
        raise ConfigError(
            "model.lora.train_text_encoder: the SD family only; an Imagen stage's LoRA trains on its UNet with "
            "the frozen text encoder, so set train_text_encoder: false"
        )
    unet.requires_grad_(False)
    return apply_lora(unet, lora.rank, lora.alpha, lora.dropout, lora.target_modules)


class MeanLoss:
    """Batch mean of a per-sample loss `fn(model, x0, cond, generator) -> (losses (B,), levels (B,))`."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(
        self, model: nn.Module, x0: torch.Tensor, cond: dict[str, Any], generator: torch.Generator
    ) -> torch.Tensor:
        losses, _ = self.fn(model, x0, cond, generator)
        return losses.float().mean()


def build_loss(stage: ImagenStage) -> MeanLoss:
    """The training loss `loss(model, x0, cond, generator) -> scalar` of the stage's preconditioning (the model
    is `ImagenTask.loss_model()`: the EDM denoiser, or the raw backbone for continuous DDPM)."""
    s = stage.settings
    p = s.preconditioning
    if s.preconditioning_type == "EDM":
        from t2i.diffusion.edm import EDMLoss

        return MeanLoss(
            EDMLoss(p_mean=p.p_mean, p_std=p.p_std, sigma_data=p.sigma_data, loss_type=p.loss_type)
        )
    from t2i.diffusion.continuous import ContinuousDDPMLoss

    return MeanLoss(
        ContinuousDDPMLoss(
            noise_schedule=p.noise_schedule, pred_objective=p.pred_objective, loss_type=p.loss_type
        )
    )


def _uncompiled(module: nn.Module) -> nn.Module:
    return getattr(module, "_orig_mod", module)


@register_task("imagen")
def build_imagen_task(cfg: RunConfig) -> ImagenTask:
    """Factory registered for `model.kind: imagen`."""
    return ImagenTask(cfg)
