"""The Imagen cascade pipeline: prompt -> text embeddings -> base stage -> SR stage(s) -> PIL images.

    cascade = t2i.load_cascade("runs/demo-imagen/cascade")          # or a list of stage folders
    out = cascade.generate("a red circle in the top left", steps=[30, 20], guidance_scale=[4.0, 2.0],
                           aug_level=0.002, seed=0, return_intermediates=True)
    out.images            # final PIL images; out.intermediates[i] = stage i's images

Each stage samples with its own sampler, steps, guidance scale, dynamic thresholding and (SR stages) low-res
augmentation level; a list gives one value per stage, a scalar applies to all, None takes the stage's default
(stage.json). Classifier-free guidance uses all-zero text embeddings and mask as the unconditional branch
(what training's drop_rate produces), or the encoding of `negative_prompt` when one is given.

Cascade folder: `cascade.yaml` (`stages: [base, sr1, ...]`, paths relative to the folder) plus one stage folder
per entry (see `t2i.pipelines.imagen_stage`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.atomic import output_folder
from t2i.errors import InvalidInputError, PipelineLoadError, checked_arguments
from t2i.pipelines.imagen_stage import ImagenStage, StageDefaults, load_stage, save_stage
from t2i.pipelines.lora_methods import LoraMethods

CASCADE_INDEX = "cascade.yaml"


@dataclass
class CascadeOutput:
    """images: final PIL images; intermediates: per stage, its PIL images; pixels: final (B, 3, H, W) in [0, 1]."""

    images: list[Any]
    intermediates: list[list[Any]] = field(default_factory=list)
    pixels: torch.Tensor | None = None


def _per_stage(value: Any, count: int, name: str) -> list[Any]:
    """A scalar (or None) for every stage, or a list with one value per stage."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise InvalidInputError(
                f"{name}: {len(value)} values for {count} stages; expected one per stage or a single value"
            )
        return list(value)
    return [value] * count


def _to_pil(images: torch.Tensor) -> list[Any]:
    from t2i.pipelines.inputs import to_pil

    return to_pil((images.float().clamp(-1, 1) + 1) / 2)


class CascadePipeline(LoraMethods):
    """A text-to-image cascade of Imagen stages sharing (or not) one text encoder.

    Args:
        stages: the stages, base first.
        defaults: per stage, the sampling defaults.
        text_encoders: per stage, its frozen text encoder (the same object may serve several stages).
    """

    def __init__(
        self,
        stages: Sequence[ImagenStage],
        defaults: Sequence[StageDefaults],
        text_encoders: Sequence[nn.Module],
    ) -> None:
        if not stages or len(stages) != len(defaults) or len(stages) != len(text_encoders):
            raise InvalidInputError(
                "CascadePipeline: expected as many stages, defaults and text encoders (>= 1)"
            )
        self.stages, self.defaults, self.text_encoders = list(stages), list(defaults), list(text_encoders)
        for i, stage in enumerate(self.stages[1:], start=1):
            if not stage.settings.is_sr:
                raise PipelineLoadError(
                    f"stage {i}: unet_type {stage.settings.unet_type!r}; every stage after "
                    "the first must be a super-resolution stage (sr-unet | sr)"
                )

    @classmethod
    def from_stages(
        cls, folders: Sequence[str | Path], device: str | torch.device = "cpu"
    ) -> CascadePipeline:
        """Load stage folders (base first); stages with the same text-encoder reference share one encoder."""
        import json

        from t2i.text.encoders import build_text_encoder

        stages, defaults, encoders, cache = [], [], [], {}
        for folder in folders:
            stage, stage_defaults = load_stage(folder, device)
            ref = json.loads((Path(folder) / "stage.json").read_text())["text_encoder"]
            key = (ref["kind"], ref.get("path"), ref.get("max_length"))
            if key not in cache:
                cache[key] = build_text_encoder(
                    ref["kind"], ref.get("path"), max_length=ref.get("max_length")
                )
                cache[key].to(device)
            stages.append(stage)
            defaults.append(stage_defaults)
            encoders.append(cache[key])
        return cls(stages, defaults, encoders)

    @property
    def device(self) -> torch.device:
        return self.stages[0].device

    def adapter_slots(self) -> list[dict[str, nn.Module]]:
        """Where LoRA files land (`t2i.lora`): one slot per stage, its UNet."""
        return [{"unet": stage.unet} for stage in self.stages]

    def adapter_slot_matches(self, index: int, metadata: dict[str, Any]) -> bool:
        """Whether stage `index` is the kind of stage (unet_type, image_size) a t2i LoRA file records."""
        s = self.stages[index].settings
        return metadata.get("unet_type") == s.unet_type and metadata.get("image_size") == s.image_size

    def to(self, device: str | torch.device) -> CascadePipeline:
        for module in [*self.stages, *self.text_encoders]:
            module.to(device)
        return self

    # ------------------------------------------------------------------------------------ generation

    @checked_arguments
    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        steps: int | Sequence[int] | None = None,
        sampler: str | Sequence[str] | None = None,
        guidance_scale: float | Sequence[float] | None = None,
        aug_level: float | Sequence[float | None] | None = None,
        dynamic_thresholding: float | Sequence[float | None] | None = None,
        seed: int = 0,
        num_images: int = 1,
        return_intermediates: bool = False,
        low_res: torch.Tensor | None = None,
    ) -> CascadeOutput:
        """Images for `prompt` (a string or list; `num_images` per prompt), stage by stage.

        Per-stage options take a list (one per stage) or a single value. `low_res` (B, 3, h, w) in [-1, 1]
        starts a cascade whose first stage is an SR stage (e.g. to test one SR stage alone).
        """
        from t2i.pipelines.inputs import negative_prompts, normalize_prompts

        prompts = [p for p in normalize_prompts(prompt) for _ in range(int(num_images))]
        negatives = None if negative_prompt is None else negative_prompts(negative_prompt, len(prompts))
        options = self._stage_options(steps, sampler, guidance_scale, aug_level, dynamic_thresholding)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        images, intermediates = low_res, []
        texts: dict[int, tuple[dict, dict | None]] = {}
        for i, stage in enumerate(self.stages):
            encoder = self.text_encoders[i]
            if id(encoder) not in texts:
                texts[id(encoder)] = (
                    _encode(encoder, prompts),
                    None if negatives is None else _encode(encoder, negatives),
                )
            text, negative = texts[id(encoder)]
            images = self._run_stage(stage, options[i], text, negative, images, generator)
            if return_intermediates:
                intermediates.append(_to_pil(images))
        return CascadeOutput(_to_pil(images), intermediates, ((images.float().clamp(-1, 1) + 1) / 2).cpu())

    def _stage_options(self, *values: Any) -> list[StageDefaults]:
        names = ("steps", "sampler", "guidance_scale", "aug_level", "dynamic_thresholding")
        count = len(self.stages)
        lists = {name: _per_stage(value, count, name) for name, value in zip(names, values)}
        options = []
        for i, defaults in enumerate(self.defaults):
            chosen = {name: lists[name][i] for name in names if lists[name][i] is not None}
            options.append(replace(defaults, **chosen))
        return options

    def _run_stage(
        self,
        stage: ImagenStage,
        options: StageDefaults,
        text: tuple[torch.Tensor, torch.Tensor],
        negative: tuple[torch.Tensor, torch.Tensor] | None,
        low_res: torch.Tensor | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """One stage's sampling loop -> images (B, 3, size, size) in [-1, 1]."""
        from t2i.diffusion.samplers import get_sampler

        s = stage.settings
        embedder = stage.text_embedder(None)
        cond = embedder.entries(*text, stage.device)
        uncond = embedder.entries(*negative, stage.device) if negative is not None else embedder.null_like(cond)
        cond |= {"uncond_context": uncond["context"], "uncond_context_mask": uncond["context_mask"]}
        if s.is_sr and low_res is None:
            raise InvalidInputError(
                "low_res: the first stage is a super-resolution stage; pass low_res "
                "images (B, 3, h, w) in [-1, 1]"
            )
        sample_generator = torch.Generator("cpu").manual_seed(
            int(torch.randint(2**31, (1,), generator=generator))
        )
        if s.is_sr:
            cond |= stage.low_res_cond(low_res, options.aug_level, sample_generator)
        denoiser = self._guided_denoiser(stage, options)
        sampler_name = options.sampler or _default_sampler(stage)
        sampler = get_sampler(sampler_name)
        sigmas = stage.sigmas(int(options.steps)).to(stage.device)
        batch = cond["context"].shape[0]
        noise = torch.randn(batch, s.unet.channels, s.image_size, s.image_size, generator=generator)
        x = noise.to(stage.device) * sigmas[0]
        return sampler(denoiser, x, sigmas, cond, generator=sample_generator).clamp(-1, 1)

    @staticmethod
    def _guided_denoiser(stage: ImagenStage, options: StageDefaults) -> nn.Module:
        from t2i.diffusion.guidance import CFGDenoiser

        denoiser = CFGDenoiser(stage.denoiser(), float(options.guidance_scale))
        if options.dynamic_thresholding is not None:
            from t2i.diffusion.thresholding import DynamicThresholding

            denoiser = DynamicThresholding(denoiser, float(options.dynamic_thresholding))
        return denoiser

    # ------------------------------------------------------------------------------------ saving

    def save_pretrained(self, folder: str | Path, names: Sequence[str] | None = None) -> Path:
        """Write a cascade folder: cascade.yaml plus one stage folder per stage (`stage0`, `stage1`, ...)."""
        from t2i.config import build_config

        folder = output_folder(folder, "cascade")
        names = list(names or [f"stage{i}" for i in range(len(self.stages))])
        for name, stage, defaults in zip(names, self.stages, self.defaults):
            cfg = build_config({"name": name, "model": stage.model_config})
            save_stage(folder / name, stage.unet, cfg, defaults)
        write_cascade_index(folder, names)
        return folder


def _encode(encoder: nn.Module, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoding = encoder.encode(prompts)
    return encoding.embeddings.float(), encoding.mask.bool()


def _default_sampler(stage: ImagenStage) -> str:
    from t2i.pipelines.imagen_stage import DEFAULT_SAMPLERS

    return DEFAULT_SAMPLERS[stage.settings.preconditioning_type]


def write_cascade_index(folder: str | Path, stage_names: Sequence[str]) -> Path:
    """cascade.yaml listing the stage subfolders, base first."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CASCADE_INDEX
    path.write_text(yaml.safe_dump({"format": "t2i-imagen-cascade", "stages": [str(n) for n in stage_names]}))
    return path


def cascade_stage_folders(folder: str | Path) -> list[Path]:
    """The stage folders a cascade folder lists (cascade.yaml, or cascade.json with the same keys)."""
    import json

    import yaml

    folder = Path(folder)
    for name, parse in ((CASCADE_INDEX, yaml.safe_load), ("cascade.json", json.loads)):
        if (folder / name).is_file():
            index = parse((folder / name).read_text()) or {}
            stages = index.get("stages") if isinstance(index, dict) else None
            if not isinstance(stages, list) or not stages:
                raise PipelineLoadError(
                    f"{folder / name}: expected a non-empty `stages:` list of stage folders"
                )
            return [folder / str(s) for s in stages]
    raise PipelineLoadError(
        f"{folder}: not a cascade folder (no {CASCADE_INDEX}); expected a folder written by "
        "CascadePipeline.save_pretrained or a list of stage folders"
    )


@checked_arguments
def load_cascade(
    path: str | Path | Sequence[str | Path], device: str | torch.device | None = None
) -> CascadePipeline:
    """A cascade from a cascade folder, or from a list of stage folders (base first)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    folders = cascade_stage_folders(path) if isinstance(path, (str, Path)) else [Path(p) for p in path]
    return CascadePipeline.from_stages(folders, device)
