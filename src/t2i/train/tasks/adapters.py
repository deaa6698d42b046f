"""LoRA and prior preservation as wrappers around any diffusion task (`DenoisingTask`), for every family.

    task = LoraTask(family_task, cfg.model.lora)           # only the adapters train; the base stays frozen
    task = PriorPreservationTask(task, cfg.model.lora.prior)  # + weight x a loss on the base's own samples

`build_task` does this for every family when `model.lora` is set (`wrap_with_adapters`). A wrapper delegates
data, loss, sampling and export to the task it wraps and changes only what it is about: LoRA changes which
parameters train and what is checkpointed and exported (the adapters alone, as a `.safetensors` LoRA file);
prior preservation adds its loss term.

Prior preservation: class images for `class_prompts` are generated once by the frozen base (every LoRA layer
bypassed), and every step adds `loss_weight` x a loss on a random batch of them, which keeps the LoRA from
overwriting what the base already draws for those prompts. Two losses:

- `diffusion`: DreamBooth (Ruiz et al. 2023, eq. 2), the ordinary diffusion loss on the class images;
- `distill`: the frozen base's own prediction on the same noised class sample is the target (the family's loss
  with `teacher=`). The diffusion target carries the full noise variance, which swamps the small drift a LoRA
  causes on old prompts; the base's prediction has none, so the loss is exactly zero until the LoRA changes what
  the model does for them (docs/LORA.md: old colours -10 points with `diffusion`, none with `distill`).

`unconditional_share` of each prior batch is conditioned on the family's null conditioning (SD: "", Imagen:
zeros), so the branch classifier-free guidance subtracts is preserved too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.config import LoraConfig, LoraPriorConfig, RunConfig
from t2i.errors import ConfigError
from t2i.lora.peft_lora import DEFAULT_ADAPTER, adapters_disabled, apply_lora, is_lora_parameter
from t2i.train.task import DiffusionTask
from t2i.train.tasks.denoising import DenoisingTask

LORA_FILE = "lora.safetensors"


class TaskWrapper(DiffusionTask):
    """A task around another: everything is delegated to `inner` unless a subclass says otherwise. EMA weights are
    swapped in at the outermost task (the one the trainer holds), so `export` does that before delegating."""

    def __init__(self, inner: DiffusionTask) -> None:
        super().__init__()
        self.inner = inner

    @property
    def family(self) -> DenoisingTask:
        """The innermost task: the diffusion family the wrappers act on."""
        task = self.inner
        while isinstance(task, TaskWrapper):
            task = task.inner
        return task

    @property
    def cfg(self) -> RunConfig:
        return self.family.cfg

    def build_dataloader(self, cfg: RunConfig, rank: int, world_size: int) -> Any:
        return self.inner.build_dataloader(cfg, rank, world_size)

    def training_loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        return self.inner.training_loss(batch, generator)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.inner.trainable_parameters()

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return self.inner.model_state_dict()

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.inner.load_model_state_dict(state)

    def sample_images(self, prompts: list[str], seed: int, **settings: Any) -> list[Any]:
        return self.inner.sample_images(prompts, seed, **settings)

    def compile_targets(self) -> list[nn.Module]:
        return self.inner.compile_targets()

    def data_stats(self) -> dict[str, int | float]:
        return self.inner.data_stats()

    def export(self, out_dir: str | Path, use_ema: bool = True) -> Path:
        with self.ema_weights(use_ema):
            return self.inner.export(out_dir, use_ema=False)


class LoraTask(TaskWrapper):
    """Low-rank adapters on the family's backbone (and optionally its text encoder); the rest stays frozen.

    `model_state_dict` (checkpoints, EMA) holds the adapter weights alone; `export` writes `lora.safetensors`:
    LoRA and DoRA in diffusers/PEFT naming (what `t2i sample --lora`, `pipe.load_lora` and diffusers'
    `load_lora_weights` read), LoHa and LoKr (`model.lora.type`) in LyCORIS' kohya naming (what A1111 and
    ComfyUI read).
    """

    def __init__(self, inner: DenoisingTask, lora: LoraConfig) -> None:
        super().__init__(inner)
        self.lora = lora
        family = self.family
        family.requires_grad_(False)
        components = family.adapter_components()
        backbone = next(iter(components))  # `unet`, or `transformer` (Flux): the prefix its LoRA file uses
        self.components = {backbone: components[backbone]}
        kind = {"kind": lora.type, "dora": lora.dora}
        self.targets = apply_lora(
            self.components[backbone], lora.rank, lora.alpha, lora.dropout, lora.target_modules, **kind
        )
        if lora.train_text_encoder:
            if "text_encoder" not in components:
                raise ConfigError(
                    "model.lora.train_text_encoder: this family's text encoder takes no adapters; set it false"
                )
            encoder = components["text_encoder"]
            apply_lora(getattr(encoder, "model", encoder), lora.rank, lora.alpha, lora.dropout, **kind)
            self.components["text_encoder"] = encoder

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """{prefix.name: parameter} of the trained adapter, over every adapted component."""
        return {
            f"{prefix}.{name}": p
            for prefix, module in self.components.items()
            for name, p in module.named_parameters()
            if is_lora_parameter(name, DEFAULT_ADAPTER)
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.lora_parameters().values())

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.lora_parameters().items()}

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        DiffusionTask.load_model_state_dict(self, state)

    def adapted_modules(self) -> list[nn.Module]:
        return list(self.components.values())

    def export(self, out_dir: str | Path, use_ema: bool = True) -> Path:
        """Write `out_dir/lora.safetensors` (PEFT/diffusers naming with alpha folded for LoRA/DoRA, LyCORIS naming
        for LoHa/LoKr); returns the file."""
        from t2i.lora.files import save_lora_file

        lora, family = self.lora, self.family
        base = base_source(family.cfg.model)
        meta = {"rank": lora.rank, "alpha": lora.alpha, "targets": lora.target_modules, "base": str(base),
                "type": lora.type, "dora": lora.dora,
                **getattr(family, "lora_metadata", dict)()}  # fmt: skip
        components = {prefix: getattr(m, "model", m) for prefix, m in self.components.items()}
        with self.ema_weights(use_ema):
            return save_lora_file(components, Path(out_dir) / LORA_FILE, metadata=meta)


class FrozenBase(nn.Module):
    """`module` run as the frozen base: without gradients and with every LoRA layer of `adapted` bypassed."""

    def __init__(self, module: nn.Module, adapted: list[nn.Module]) -> None:
        super().__init__()
        self.module = module
        self.adapted = adapted

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.no_grad(), adapters_disabled(*self.adapted):
            return self.module(*args, **kwargs)


class PriorPreservationTask(TaskWrapper):
    """Adds `loss_weight` x the prior-preservation loss (`diffusion` or `distill`) on the base's class samples."""

    def __init__(self, inner: LoraTask, prior: LoraPriorConfig, seed: int = 0) -> None:
        super().__init__(inner)
        self.prior, self.seed = prior, seed
        self.family.check_prior_preservation()
        self.class_x0: torch.Tensor | None = None
        self.class_cond: dict[str, torch.Tensor] = {}
        self.null_cond: dict[str, torch.Tensor] = {}

    def adapted_modules(self) -> list[nn.Module]:
        return self.inner.adapted_modules()

    def build_dataloader(self, cfg: RunConfig, rank: int, world_size: int) -> Any:
        loader = self.inner.build_dataloader(cfg, rank, world_size)
        if self.class_x0 is None:
            self.make_class_samples()
        return loader

    @torch.no_grad()
    def make_class_samples(self) -> None:
        """The class samples (N, ...) in the loss's space and their conditioning, drawn once by the frozen base."""
        prior, family = self.prior, self.family
        was_training = family.training
        family.eval()
        try:
            with adapters_disabled(*self.adapted_modules()):
                self.class_x0 = family.sample_model_space(
                    list(prior.class_prompts), self.seed, prior.num_images, prior.steps, prior.guidance_scale
                )
                prompts = [p for p in prior.class_prompts for _ in range(prior.num_images)]
                self.class_cond = family.conditioner.prompts(prompts, family.device)
                self.null_cond = family.conditioner.unconditional(self.class_cond)
        finally:
            family.train(was_training)

    def unconditional_count(self, batch_size: int) -> int:
        """How many of a prior batch of `batch_size` take the unconditional conditioning."""
        return min(batch_size, round(self.prior.unconditional_share * batch_size))

    def training_loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        loss = self.inner.training_loss(batch, generator)
        if self.class_x0 is None:
            return loss
        return loss + self.prior.loss_weight * self.prior_loss(self.cfg.data.batch_size, generator)

    def prior_loss(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """The prior-preservation loss on `batch_size` class samples drawn at random."""
        family = self.family
        index = torch.randint(len(self.class_x0), (batch_size,), generator=generator, device=generator.device)
        index = index.to(self.class_x0.device)
        x0, cond = self.class_x0[index], {k: v[index] for k, v in self.class_cond.items()}
        unconditional = self.unconditional_count(batch_size)
        if unconditional:
            cond = {k: torch.cat([self.null_cond[k][index[:unconditional]], v[unconditional:]]) for k, v in cond.items()}
        teacher = None
        if self.prior.loss == "distill":
            teacher = family.denoiser(net=FrozenBase(family.backbone, self.adapted_modules()))
        return family.loss(family.denoiser(), x0, cond, generator, teacher=teacher).float().mean()


def base_source(model: Any) -> Any:
    """Where the family's base weights come from: `from_pretrained` of the model, its UNet or its transformer."""
    sections = (model, getattr(model, "unet_config", None), getattr(model, "transformer_config", None))
    return next((s.from_pretrained for s in sections if getattr(s, "from_pretrained", None) is not None), None)


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


def wrap_with_adapters(task: DenoisingTask, cfg: RunConfig) -> DiffusionTask:
    """`task` in LoRA per `model.lora`, and in prior preservation when `model.lora.prior` is set."""
    lora = cfg.model.lora
    wrapped: DiffusionTask = LoraTask(task, lora)
    if lora.prior is not None:
        wrapped = PriorPreservationTask(wrapped, lora.prior, cfg.seed)
    return wrapped
