"""Model adapters: the one place the server knows a pipeline class. Each adapter says what its model accepts
(sizes, samplers, prompt length, defaults) and turns one batch of rows into PIL images.

A new family (SDXL, Flux) is one more `ModelAdapter` subclass registered with `@adapter_for(PipelineClass)`.

Reproducibility contract (SD): image `j` of a request with seed `s` is sampled from its own generator seeded
`s + j`, for its initial latents and every stochastic sampler step (`generate(generator=[...])`), so it is the
same image whether its request ran alone or batched with others (up to float rounding of batched kernels).
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from t2i.errors import InvalidInputError, LoraError

Progress = Callable[[int, int], None]  # (steps done, steps in all)


@dataclass(frozen=True)
class BatchKey:
    """What every row of one sampler batch shares. Rows with equal keys may run together."""

    model: str
    task: str  # "generate" | "edit" (image-to-image) | "inpaint" (with a mask) | "instruct" (InstructPix2Pix)
    width: int
    height: int
    steps: int | None
    sampler: str | None
    guidance: float | None
    loras: tuple[tuple[str, float], ...] = ()
    strength: float | None = None
    solo: str | None = None  # a request id: keeps the request's rows to themselves (adapters that cannot batch)


@dataclass
class Row:
    """One output image: its prompt, negative prompt, seed and (edits) init image and mask."""

    prompt: str
    negative_prompt: str
    seed: int
    image: Any = None
    mask: Any = None


ADAPTERS: dict[type, type[ModelAdapter]] = {}


def adapter_for(pipeline_class: type) -> Callable[[type[ModelAdapter]], type[ModelAdapter]]:
    """Class decorator registering an adapter for `pipeline_class`."""

    def register(cls: type[ModelAdapter]) -> type[ModelAdapter]:
        ADAPTERS[pipeline_class] = cls
        return cls

    return register


def make_adapter(model_id: str, pipeline: Any, lora_dir: Path | None = None) -> ModelAdapter:
    """The adapter registered for `pipeline`'s class (or a base class of it)."""
    for cls in type(pipeline).__mro__:
        if cls in ADAPTERS:
            return ADAPTERS[cls](model_id, pipeline, lora_dir)
    raise InvalidInputError(f"model {model_id}: no server adapter for {type(pipeline).__name__}")


def lora_files(lora_dir: Path | None) -> dict[str, Path]:
    """{name: path} of the `.safetensors` LoRAs in `lora_dir` (name = file stem); read once at start."""
    if lora_dir is None:
        return {}
    return {p.stem: p for p in sorted(Path(lora_dir).glob("*.safetensors")) if p.is_file()}


class ModelAdapter:
    """What the server needs from a model. Subclasses fill the class attributes and implement `run`."""

    kind: ClassVar[str] = ""
    batches_requests: ClassVar[bool] = True  # rows of different requests may share a sampler batch
    supports_edits: ClassVar[bool] = False
    unet_task: str = "generate"  # `inpaint` / `instruct`: the model only inpaints / follows edit instructions

    def __init__(self, model_id: str, pipeline: Any, lora_dir: Path | None = None) -> None:
        self.id, self.pipeline = model_id, pipeline
        self.loras = lora_files(lora_dir)
        self.unfit_loras: dict[str, str] = {}  # LoRA name -> why it does not fit this model (learnt on first use)

    # ------------------------------------------------------------------ what the model accepts
    size_multiple: int = 8
    default_size: tuple[int, int] = (512, 512)
    default_steps: int | None = None
    default_guidance: float | None = None
    default_sampler: str | None = None
    samplers: tuple[str, ...] = ()
    max_prompt_tokens: int = 77

    def check_size(self, width: int, height: int) -> str | None:
        """None when the model can make (width, height); else why not."""
        m = self.size_multiple
        if width % m or height % m:
            return f"{width}x{height} is not a multiple of {m} on both sides"
        return None

    def check_sampling(self, sampler: str | None, steps: int | None, strength: float | None) -> None:
        """Raise a T2IError (naming the option) when the sampler / steps / strength cannot be run."""

    def prompt_tokens(self, prompt: str) -> int:
        """How many tokens `prompt` takes, special tokens included (compared with `max_prompt_tokens`)."""
        raise NotImplementedError

    def steps_of(self, key: BatchKey) -> int:
        """Sampler steps a batch with `key` reports progress over."""
        return int(key.steps or 0)

    def info(self) -> dict[str, Any]:
        """The model's `t2i` block in /v1/models."""
        return {
            "kind": self.kind,
            "default_size": f"{self.default_size[0]}x{self.default_size[1]}",
            "size_multiple": self.size_multiple,
            "default_steps": self.default_steps,
            "default_guidance": self.default_guidance,
            "default_sampler": self.default_sampler,
            "samplers": list(self.samplers),
            "max_prompt_tokens": self.max_prompt_tokens,
            "batches_requests": self.batches_requests,
            "edits": self.supports_edits,
            "loras": sorted(self.loras),
        }

    def run(self, key: BatchKey, rows: list[Row], progress: Progress) -> list[Any]:
        """PIL images, one per row (same order). Runs on the sampling thread."""
        raise NotImplementedError

    # ------------------------------------------------------------------ LoRAs
    def apply_loras(self, wanted: tuple[tuple[str, float], ...]) -> None:
        """Make exactly the LoRAs `wanted` ((name, scale) pairs) active on the pipeline; others unloaded."""
        from t2i.lora.inference import load_lora, loaded_loras, set_lora_scale, unload_lora

        current = loaded_loras(self.pipeline)
        names = {adapter_name(name): (name, scale) for name, scale in wanted}
        for loaded in set(current) - set(names):
            unload_lora(self.pipeline, loaded)
        for internal, (name, scale) in names.items():
            if internal not in current:
                try:
                    load_lora(self.pipeline, self.loras[name], scale=scale, name=internal)
                except LoraError as err:
                    self.unfit_loras[name] = str(err)
                    self.apply_loras(tuple(w for w in wanted if w[0] != name))
                    raise LoraError(f"lora {name!r} does not fit model {self.id}: {err}") from None
            elif current[internal] != scale:
                set_lora_scale(self.pipeline, internal, scale)


def adapter_name(lora_name: str) -> str:
    """A peft adapter name for a LoRA file name: peft module keys may not hold '.' or '-', and the checksum keeps
    `a-b` and `a_b` apart."""
    safe = "".join(ch if ch.isalnum() else "_" for ch in lora_name)
    return f"serve_{safe}_{zlib.crc32(lora_name.encode()):08x}"


def _latent_pipeline_class() -> type:
    from t2i.pipelines.latent import LatentPipeline

    return LatentPipeline


def _cascade_pipeline_class() -> type:
    from t2i.pipelines.cascade import CascadePipeline

    return CascadePipeline


def _counting_tokenizer(tokenizer: Any) -> Any:
    """A private copy of `tokenizer` for the event loop: HF fast tokenizers must not be called from two threads
    at once (the sampling thread uses the original)."""
    return copy.deepcopy(tokenizer)


def count_tokens(tokenizer: Any, prompt: str) -> int:
    return len(tokenizer(prompt, truncation=False, add_special_tokens=True)["input_ids"])


@adapter_for(_latent_pipeline_class())
class LatentAdapter(ModelAdapter):
    """Stable Diffusion (`LatentPipeline`): text-to-image and image-to-image, batched across requests."""

    kind = "latent_diffusion"
    batches_requests = True
    supports_edits = True

    def __init__(self, model_id: str, pipeline: Any, lora_dir: Path | None = None) -> None:
        from t2i.diffusion.samplers import available_samplers
        from t2i.pipelines.latent import DEFAULT_STEPS

        super().__init__(model_id, pipeline, lora_dir)
        self.size_multiple = pipeline.size_multiple
        self.default_size = (pipeline.default_size, pipeline.default_size)
        self.default_steps, self.default_guidance = DEFAULT_STEPS, pipeline.default_guidance
        self.default_sampler = pipeline.default_sampler
        self.samplers = tuple(name for name in available_samplers() if self._plans(name))
        encoders = list(pipeline.text_encoders.values())  # SDXL: both CLIP tokenizers count alike
        self.max_prompt_tokens = min(int(e.max_length) for e in encoders)
        self.tokenizer = _counting_tokenizer(encoders[0].tokenizer)

    def _plans(self, sampler: str) -> bool:
        from t2i.errors import T2IError

        try:
            self.pipeline.plan(sampler, 2)
        except T2IError:
            return False
        return True

    def check_sampling(self, sampler: str | None, steps: int | None, strength: float | None) -> None:
        steps = int(steps or self.default_steps)
        self.pipeline.plan(sampler, steps)
        if strength is not None and min(int(steps * strength), steps) < 1:
            raise InvalidInputError(
                f"strength: {strength} x steps {steps} leaves no step to run; expected strength * steps >= 1"
            )

    def prompt_tokens(self, prompt: str) -> int:
        return count_tokens(self.tokenizer, prompt)

    def steps_of(self, key: BatchKey) -> int:
        steps = int(key.steps or self.default_steps)
        return min(int(steps * key.strength), steps) if key.task in ("edit", "inpaint") else steps

    def run(self, key: BatchKey, rows: list[Row], progress: Progress) -> list[Any]:
        return self.sample(key, rows, progress).images

    def sample(self, key: BatchKey, rows: list[Row], progress: Progress | None = None) -> Any:
        """The pipeline's `GenerationOutput` for the rows: one generator per row, seeded with the row's seed."""
        import torch

        self.apply_loras(key.loras)
        total = self.steps_of(key)
        callback = None if progress is None else (lambda i, *_: progress(i + 1, total))
        common = {
            "negative_prompt": [r.negative_prompt for r in rows],
            "height": key.height,
            "width": key.width,
            "steps": int(key.steps or self.default_steps),
            "guidance_scale": float(self.default_guidance if key.guidance is None else key.guidance),
            "sampler": key.sampler,
            "progress": False,
            "generator": [torch.Generator("cpu").manual_seed(r.seed) for r in rows],
            "callback": callback,
        }
        prompts, images = [r.prompt for r in rows], [r.image for r in rows]
        if key.task == "inpaint":
            masks = [self.mask_tensor(r.mask, key) for r in rows]
            return self.pipeline.inpaint(prompts, images, torch.cat(masks), strength=key.strength, **common)
        if key.task == "instruct":
            common = {k: v for k, v in common.items() if k not in ("height", "width")}
            return self.pipeline.edit(prompts, [im.resize((key.width, key.height)) for im in images], **common)
        if key.task == "edit":
            return self.pipeline.reconstruct(prompts, images, strength=key.strength, **common)
        return self.pipeline.generate(prompts, **common)

    @staticmethod
    def mask_tensor(mask: Any, key: BatchKey) -> Any:
        """A PIL mask (white = repaint) at the output size as (1, 1, H, W) in [0, 1]."""
        import numpy as np
        import torch
        from PIL import Image

        resized = mask.resize((key.width, key.height), Image.NEAREST)
        return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)[None, None]

    @property
    def unet_task(self) -> str:
        return self.pipeline.unet_task


@adapter_for(_cascade_pipeline_class())
class CascadeAdapter(ModelAdapter):
    """Imagen cascade (`CascadePipeline`): text-to-image at the last stage's size. Each request runs as its own
    batch (the cascade draws one request's noise from one generator), and progress is reported per request."""

    kind = "imagen_cascade"
    batches_requests = False
    supports_edits = False

    def __init__(self, model_id: str, pipeline: Any, lora_dir: Path | None = None) -> None:
        from t2i.pipelines.imagen_stage import DEFAULT_SAMPLERS

        super().__init__(model_id, pipeline, lora_dir)
        size = int(pipeline.stages[-1].settings.image_size)
        self.size_multiple, self.default_size = size, (size, size)
        stage_samplers = {d.sampler or DEFAULT_SAMPLERS[s.settings.preconditioning_type]
                          for s, d in zip(pipeline.stages, pipeline.defaults)}
        self.samplers = tuple(sorted(stage_samplers)) if len(stage_samplers) == 1 else ()
        self.tokenizers = [_counting_tokenizer(e.tokenizer) for e in {id(e): e for e in pipeline.text_encoders}.values()]
        self.max_prompt_tokens = min(int(e.max_length) for e in pipeline.text_encoders)

    def check_size(self, width: int, height: int) -> str | None:
        if (width, height) != self.default_size:
            return f"{width}x{height}: this cascade makes {self.default_size[0]}x{self.default_size[1]} images only"
        return None

    def check_sampling(self, sampler: str | None, steps: int | None, strength: float | None) -> None:
        if sampler is not None and sampler not in self.samplers:
            raise InvalidInputError(
                f"sampler: {sampler!r}; this cascade samples each stage with its own sampler "
                f"({', '.join(self.samplers) or 'they differ'}): leave sampler out"
            )

    def prompt_tokens(self, prompt: str) -> int:
        return max(count_tokens(t, prompt) for t in self.tokenizers)

    def steps_of(self, key: BatchKey) -> int:
        return len(self.pipeline.stages)

    def run(self, key: BatchKey, rows: list[Row], progress: Progress) -> list[Any]:
        self.apply_loras(key.loras)
        first = rows[0]
        if any((r.prompt, r.negative_prompt) != (first.prompt, first.negative_prompt) for r in rows):
            raise InvalidInputError("a cascade batch holds the rows of one request only")
        out = self.pipeline.generate(
            first.prompt,
            negative_prompt=first.negative_prompt or None,
            steps=key.steps,
            sampler=key.sampler,
            guidance_scale=key.guidance,
            seed=first.seed,
            num_images=len(rows),
        )
        progress(self.steps_of(key), self.steps_of(key))
        return out.images
