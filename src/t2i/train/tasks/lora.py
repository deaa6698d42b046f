"""LoRA fine-tuning of a Stable Diffusion pipeline: only the low-rank adapters train, the base stays frozen.

The base is anything `t2i.load_pipeline` reads (a diffusers folder, a t2i pipeline folder, a single file with its
`model:` config) or a t2i run folder (its exported pipeline). With a config, the base path is
`model.unet_config.from_pretrained` and the adapter settings are `model.lora: {rank, alpha, dropout,
target_modules}`; `target_modules` null means the attention q/k/v/out projections (`attention`), `[attention,
ff]` adds the feed-forward layers, and suffixes such as `attn2.to_k` pick modules by name.

Prior preservation: class images for `class_prompts` are generated once by the frozen base model, and every
step adds `prior_loss_weight` x a loss on a random batch of them, which keeps the LoRA from overwriting what
the base already draws for those prompts. Two losses (`PriorPreservation.loss`):

- `diffusion`: DreamBooth (Ruiz et al. 2023, eq. 2), the ordinary diffusion loss on the class images;
- `distill`: the frozen base's own prediction on the same noised class latent is the target (the LoRA
  switched off for that forward). The diffusion target carries the full noise variance, which swamps the small
  drift a LoRA causes on old prompts; the base's prediction has none, so the loss is exactly zero until the
  LoRA changes what the model does for them (docs/LORA.md: old colours -10 points with `diffusion`, none with
  `distill`, on the same run).

Batches are online: `{"images" (B, 3, H, W) in [-1, 1], "captions": list[str]}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.config import PRIOR_LOSSES, LoraPriorConfig, RunConfig
from t2i.diffusion.objectives import DiffusionObjective
from t2i.errors import ConfigError, LoraError
from t2i.lora.files import save_lora_file
from t2i.lora.peft_lora import DEFAULT_ADAPTER, adapters_disabled, apply_lora, is_lora_parameter
from t2i.train.task import DiffusionTask
from t2i.train.tasks import ObservedLoader

PARAMETERIZATION_OF = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
LORA_FILE = "lora.safetensors"


@dataclass
class PriorPreservation:
    """Class images made by the base model: `num_images` per prompt, weighted by `weight` in the loss, which is
    `diffusion` (DreamBooth) or `distill` (match the frozen base's prediction)."""

    class_prompts: list[str] = field(default_factory=list)
    num_images: int = 8
    weight: float = 1.0
    steps: int = 25
    guidance_scale: float = 4.0
    seed: int = 0
    loss: str = "diffusion"
    unconditional_share: float = 0.0  # of each prior batch, conditioned on "" (CFG's unconditional branch)

    def __post_init__(self) -> None:
        if self.loss not in PRIOR_LOSSES:
            raise ConfigError(f"prior loss: {self.loss!r} is not one of {', '.join(PRIOR_LOSSES)}")

    @classmethod
    def from_config(cls, prior: LoraPriorConfig, seed: int = 0) -> PriorPreservation:
        """`model.lora.prior` -> the task's settings."""
        return cls(list(prior.class_prompts), prior.num_images, prior.loss_weight, prior.steps,
                   prior.guidance_scale, seed, prior.loss, prior.unconditional_share)  # fmt: skip

    def unconditional_count(self, batch_size: int) -> int:
        """How many of a prior batch of `batch_size` take the unconditional text."""
        return min(batch_size, round(self.unconditional_share * batch_size))


def resolve_base(path: str | Path) -> Path:
    """A pipeline folder, a single file, or a t2i run folder (-> its `export/` or `pipeline/` folder)."""
    path = Path(path)
    if path.is_dir() and not (path / "model_index.json").is_file():
        for sub in ("export", "pipeline"):
            if (path / sub / "model_index.json").is_file():
                return path / sub
    return path


def load_base_pipeline(cfg: RunConfig) -> Any:
    """The frozen base pipeline named by `model.unet_config.from_pretrained` (single files use `cfg.model`)."""
    from t2i.pipelines.loading import load_pipeline

    source = cfg.model.unet_config.from_pretrained
    if source is None:
        raise ConfigError(
            "model.unet_config.from_pretrained: missing; LoRA training needs the base pipeline "
            "(diffusers/t2i folder, single file or t2i run folder)"
        )
    base = resolve_base(source)
    return load_pipeline(base, config=None if base.is_dir() else cfg.model)


class LoraTask(DiffusionTask):
    """LoRA adapters on a frozen pipeline's UNet (and optionally its text encoder), trained with the
    pipeline's own noise schedule and prediction type."""

    def __init__(
        self,
        cfg: RunConfig,
        pipe: Any,
        prior: PriorPreservation | None = None,
        train_text_encoder: bool = False,
    ) -> None:
        super().__init__()
        lora = cfg.model.lora
        if lora is None:
            raise ConfigError("model.lora: missing; expected {rank, alpha, dropout, target_modules}")
        self.cfg, self.pipe, self.prior = cfg, pipe, prior
        pipe.unet.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        self.unet, self.first_stage, self.text_encoder = pipe.unet, pipe.first_stage, pipe.text_encoder
        self.targets = apply_lora(self.unet, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
        self.train_text_encoder = train_text_encoder
        if train_text_encoder:
            apply_lora(self.text_encoder.model, lora.rank, lora.alpha, lora.dropout)
        parameterization = PARAMETERIZATION_OF[pipe.prediction_type]
        self.objective = DiffusionObjective(
            pipe.alphas_cumprod(), parameterization, cfg.model.min_snr_gamma, cfg.model.offset_noise
        )
        self.class_latents: torch.Tensor | None = None
        self.class_context: torch.Tensor | None = None
        self.unconditional_context: torch.Tensor | None = None
        self._data: ObservedLoader | None = None

    # ------------------------------------------------------------------------------------ parameters

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if is_lora_parameter(n, DEFAULT_ADAPTER)]

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the LoRA weights: what is checkpointed, EMA-averaged and exported."""
        return {n: p.detach() for n, p in self.named_parameters() if is_lora_parameter(n, DEFAULT_ADAPTER)}

    def train(self, mode: bool = True) -> LoraTask:
        super().train(mode)
        self.first_stage.eval()  # frozen parts never run dropout
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ------------------------------------------------------------------------------------ data and loss

    def build_dataloader(self, cfg: RunConfig, rank: int, world_size: int) -> ObservedLoader:
        """Endless image-caption batches of `data.train` (shards or an image folder)."""
        from t2i.data.readers import build_dataset

        d = cfg.data
        dataset = build_dataset(
            d.train,
            d.resolution,
            d.center_crop,
            d.random_flip,
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
            shuffle_buffer=d.shuffle_buffer,
            repeat=True,
        )
        self._data = ObservedLoader(dataset, d.batch_size, d.num_workers, cfg.seed)
        if self.prior is not None and self.class_latents is None:
            self.make_class_images()
        return self._data

    def data_stats(self) -> dict[str, int | float]:
        return self._data.data_stats() if self._data is not None else {}

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> context (B, T, D); with gradients when the text encoder carries a trained LoRA."""
        if not self.train_text_encoder:
            return self.text_encoder.encode(prompts).embeddings.to(self.device).float()
        ids, mask = self.text_encoder.tokenize(prompts)
        return self.text_encoder.forward_tokens(ids, mask).embeddings.to(self.device).float()

    @torch.no_grad()
    def make_class_images(self) -> None:
        """Generate the prior-preservation class latents (B, C, h, w) and their text context with the frozen
        base (LoRA scale 0), once."""
        prior = self.prior
        if not prior.class_prompts or prior.num_images < 1:
            raise LoraError("prior.class_prompts / num_images: expected at least one prompt and one image")
        size = self.cfg.data.resolution
        with self.lora_disabled():
            out = self.pipe.generate(
                prior.class_prompts,
                num_images=prior.num_images,
                steps=prior.steps,
                guidance_scale=prior.guidance_scale,
                seed=prior.seed,
                height=size,
                width=size,
                progress=False,
            )
        prompts = [p for p in prior.class_prompts for _ in range(prior.num_images)]
        self.class_latents = out.latents.to(self.device)
        # "" is encoded with the class prompts so that its context has their padded length
        contexts = self.text_encoder.encode([*prompts, ""]).embeddings.to(self.device).float()
        self.class_context, self.unconditional_context = contexts[:-1], contexts[-1:]

    def lora_disabled(self) -> Any:
        """Context manager running the base model alone (every LoRA layer bypassed)."""
        return adapters_disabled(self.unet, self.text_encoder)

    def training_loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """Diffusion loss on the batch (+ prior_loss_weight x the prior loss on a random batch of class images)."""
        z = self.first_stage.encode(batch["images"].to(self.device), generator)
        context = self.encode_text(list(batch["captions"]))
        loss = self.objective.loss(self.unet, z, {"context": context}, generator)
        if self.prior is not None and self.class_latents is not None:
            loss = loss + self.prior.weight * self.prior_loss(z.shape[0], generator)
        return loss

    def prior_loss(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """The prior-preservation loss on `batch_size` class latents drawn at random."""
        index = torch.randint(
            len(self.class_latents), (batch_size,), generator=generator, device=generator.device
        ).to(self.device)
        context = self.class_context[index]
        unconditional = self.prior.unconditional_count(batch_size)
        if unconditional:
            context = torch.cat([self.unconditional_context.expand(unconditional, -1, -1), context[unconditional:]])
        latents, cond = self.class_latents[index], {"context": context}
        if self.prior.loss == "diffusion":
            return self.objective.loss(self.unet, latents, cond, generator)
        noised = self.objective.prepare(latents, generator)
        with torch.no_grad(), self.lora_disabled():
            base_prediction = self.unet(noised.x_t, noised.t, **cond)
        prediction = self.unet(noised.x_t, noised.t, **cond)
        return self.objective.weighted_mse(prediction, replace(noised, target=base_prediction))

    # ------------------------------------------------------------------------------------ sampling, export

    @torch.no_grad()
    def sample_images(
        self, prompts: list[str], seed: int, steps: int = 25, guidance_scale: float = 4.0
    ) -> list[Any]:
        """One PIL image per prompt from the pipeline with the (EMA) LoRA active."""
        size = self.cfg.data.resolution
        out = self.pipe.generate(
            list(prompts),
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            height=size,
            width=size,
            progress=False,
        )
        return out.images

    def export(self, out_dir: str | Path, use_ema: bool = True) -> Path:
        """Write `out_dir/lora.safetensors` (PEFT/diffusers naming, alpha folded); returns the file."""
        lora = self.cfg.model.lora
        components = {"unet": self.unet}
        if self.train_text_encoder:
            components["text_encoder"] = self.text_encoder
        meta = {
            "rank": lora.rank,
            "alpha": lora.alpha,
            "targets": lora.target_modules,
            "base": str(self.cfg.model.unet_config.from_pretrained),
        }
        with self.ema_weights(use_ema):
            return save_lora_file(components, Path(out_dir) / LORA_FILE, metadata=meta)


def build_lora_task(cfg: RunConfig) -> LoraTask:
    """The task for a `latent_diffusion` config with `model.lora` set (base: unet_config.from_pretrained;
    `model.lora.prior` and `model.lora.train_text_encoder` as configured)."""
    lora = cfg.model.lora
    prior = PriorPreservation.from_config(lora.prior, cfg.seed) if lora.prior is not None else None
    return LoraTask(cfg, load_base_pipeline(cfg), prior=prior, train_text_encoder=lora.train_text_encoder)
