"""Personalisation on the shapes demo: teach a trained shapes model a colour it never saw, with a LoRA.

1. `write_concept_folder`: <= 50 images of the new colour (every shape, random positions), drawn with the shapes
   module's own drawing code and recoloured, with captions "a teal square in the top left";
2. LoRA training (`t2i.train.tasks.adapters`: the SD task wrapped in LoRA and prior preservation) on base-model
   samples of old prompts, so the old colours are not forgotten (distillation: the LoRA model must predict what
   the frozen base predicts on them);
3. `evaluate`: the analytic judge, its palette extended by the new colour, scores the new prompts; the standard
   judge scores old (held-out) prompts for the base and the LoRA model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from t2i.data import judge
from t2i.data.shapes import COLOURS, POSITION_PHRASES, POSITIONS, SHAPES, draw_shape

# A LoRA on the UNet cannot teach a colour the frozen VAE cannot decode, and which colours a demo VAE decodes
# varies from one trained VAE to another (docs/LORA.md: teal 96%, 100%, 0%; brown 62%, 0%, 92% on three).
# `vae_round_trip` measures it for the base at hand; colour="auto" picks the best candidate.
NEW_COLOURS: dict[str, tuple[int, int, int]] = {
    "teal": (0, 128, 128),
    "brown": (120, 70, 20),
    "cyan": (30, 200, 220),
    "pink": (245, 110, 190),
}


@dataclass
class PersonalizeSettings:
    """Sizes of one personalisation run (defaults: the documented measurement; `small()`: the test)."""

    colour: str = "auto"  # a NEW_COLOURS name, or auto: the one the base's VAE decodes best
    num_images: int = 48
    steps: int = 600
    batch_size: int = 8
    rank: int = 4
    alpha: float | None = None  # None = rank
    # ResBlock convolutions too: attention alone cannot make the UNet emit a latent colour it never produced
    target_modules: list[str] | None = field(default_factory=lambda: ["attention", "ff", "conv"])
    lr: float = 1.5e-3
    prior_prompts: int = 24
    prior_images: int = 1
    prior_weight: float = 1.0
    # distill: the base's prediction is the prior target; DreamBooth's diffusion loss let old colours drift
    prior_loss: str = "distill"
    # a quarter of each prior batch distils the "" branch, which CFG subtracts (seeds 1, 2: brown 77/79% -> 81/82%)
    prior_unconditional: float = 0.25
    scale: float = 1.0  # LoRA scale at inference (< 1 trades the new colour for the old ones)
    sample_steps: int = 20
    guidance_scale: float = 4.0
    eval_seeds: int = 4
    seed: int = 0


def concept_caption(colour: str, shape: str, position: str) -> str:
    return f"a {colour} {shape} {POSITION_PHRASES[position]}"


def draw_concept(colour: str, shape: str, position: str, size: int, rng: np.random.Generator) -> Any:
    """A shapes-dataset image in a colour outside the palette: drawn in red, then red pixels recoloured
    (shapes are drawn without antialiasing, so the fill is exactly the palette colour)."""
    image = np.asarray(draw_shape("red", shape, position, size, rng)).copy()
    fill = np.all(image == np.asarray(COLOURS["red"], dtype=np.uint8), axis=-1)
    image[fill] = NEW_COLOURS[colour]
    from PIL import Image

    return Image.fromarray(image)


def concept_prompts(colour: str) -> list[str]:
    """Every (shape, position) of the new colour: 36 prompts."""
    return [concept_caption(colour, s, p) for s in SHAPES for p in POSITIONS]


def write_concept_folder(folder: Path, colour: str, num: int, size: int, seed: int) -> Path:
    """`num` PNGs of the new colour + `metadata.jsonl` (HF imagefolder captions); shapes cycle, positions random."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(num):
        shape, position = SHAPES[i % len(SHAPES)], POSITIONS[int(rng.integers(len(POSITIONS)))]
        draw_concept(colour, shape, position, size, rng).save(folder / f"{i:05d}.png")
        lines.append(
            json.dumps({"file_name": f"{i:05d}.png", "text": concept_caption(colour, shape, position)})
        )
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


# ------------------------------------------------------------------------------------------ judging


def score_concept(images: list[Any], prompts: list[str], colour: str) -> dict[str, float]:
    """Accuracy of colour / shape / position / all three on new-colour prompts (extended palette)."""
    palette = {**COLOURS, colour: NEW_COLOURS[colour]}
    hits = []
    for image, prompt in zip(images, prompts, strict=True):
        words = prompt.split()
        expected = (words[1], words[2], next(p for p, ph in POSITION_PHRASES.items() if prompt.endswith(ph)))
        found = judge.judge_image(image, palette)
        hits.append([found.colour == expected[0], found.shape == expected[1], found.position == expected[2]])
    array = np.asarray(hits, dtype=bool)
    names = ("colour", "shape", "position")
    return {**{n: float(array[:, i].mean()) for i, n in enumerate(names)}, "all": float(array.all(1).mean())}


# ------------------------------------------------------------------------------------------ the run


def vae_round_trip(pipe: Any, colour: str, size: int, count: int = 24, seed: int = 1) -> float:
    """Share of new-colour images whose colour the judge still reads after the pipeline's VAE encodes and decodes
    them: the ceiling on what a UNet LoRA can reach for that colour."""
    import torch

    from t2i.data.transforms import to_tensor
    from t2i.pipelines.inputs import to_pil

    rng = np.random.default_rng(seed)
    drawn = [draw_concept(colour, SHAPES[i % len(SHAPES)], POSITIONS[i % len(POSITIONS)], size, rng)
             for i in range(count)]  # fmt: skip
    images = torch.stack([to_tensor(im) for im in drawn]).to(pipe.device)
    with torch.no_grad():  # posterior samples, as LoRA training sees them, from a fixed generator: repeatable
        pixels = pipe.decode(pipe.first_stage.encode(images, torch.Generator(pipe.device).manual_seed(seed)))
    palette = {**COLOURS, colour: NEW_COLOURS[colour]}
    return float(np.mean([judge.judge_image(im, palette).colour == colour for im in to_pil(pixels)]))


def sample(pipe: Any, prompts: list[str], settings: PersonalizeSettings, size: int) -> list[Any]:
    images = []
    for seed in range(settings.eval_seeds):
        out = pipe.generate(
            prompts,
            steps=settings.sample_steps,
            guidance_scale=settings.guidance_scale,
            seed=1000 + seed,
            height=size,
            width=size,
            progress=False,
        )
        images += out.images
    return images


def old_prompts(count: int, seed: int) -> list[str]:
    from t2i.data.shapes import training_prompts

    prompts = training_prompts()
    rng = np.random.default_rng(seed)
    return [prompts[i] for i in rng.choice(len(prompts), size=count, replace=False)]


def lora_run_config(settings: PersonalizeSettings, data: Path, out: Path, size: int) -> Any:
    from t2i.config import build_config

    prior = None
    if settings.prior_prompts > 0:  # class images made by the base model (prior preservation)
        prior = {"class_prompts": old_prompts(settings.prior_prompts, settings.seed),
                 "num_images": settings.prior_images, "loss_weight": settings.prior_weight,
                 "loss": settings.prior_loss, "steps": settings.sample_steps,
                 "guidance_scale": settings.guidance_scale, "unconditional_share": settings.prior_unconditional}
    return build_config({
        "name": "shapes-lora", "seed": settings.seed,
        "model": {"kind": "latent_diffusion", "text_drop_rate": 0.0,
                  "lora": {"rank": settings.rank,
                           "alpha": float(settings.alpha if settings.alpha is not None else settings.rank),
                           "target_modules": settings.target_modules, "prior": prior},
                  "optim": {"lr": settings.lr, "weight_decay": 0.0}},
        "data": {"train": [str(data)], "resolution": size, "batch_size": settings.batch_size,
                 "shuffle_buffer": 64},
        "trainer": {"max_steps": settings.steps, "log_every": max(settings.steps // 5, 1), "sample_every": 0,
                    "checkpoint_every": 10**6, "keep_last": 1, "out_dir": str(out / "run"),
                    "ema": {"enabled": False}},
    })  # fmt: skip


def personalize(
    base: str | Path, out: str | Path, settings: PersonalizeSettings | None = None
) -> dict[str, Any]:
    """Train a LoRA teaching `settings.colour` to the shapes pipeline at `base`; returns the measurements
    (also written to out/results.json) and writes out/lora.safetensors."""
    import json

    from t2i.data.shapes import heldout_prompts
    from t2i.lora.inference import load_lora
    from t2i.pipelines.loading import load_pipeline
    from t2i.train.task import seed_everything
    from t2i.train.tasks.adapters import LoraTask, PriorPreservationTask, resolve_base
    from t2i.train.tasks.latent import LatentDiffusionTask
    from t2i.train.trainer import train

    settings, out = settings or PersonalizeSettings(), Path(out)
    pipe = load_pipeline(resolve_base(base))
    if not hasattr(pipe, "unet"):
        from t2i.errors import InvalidInputError

        raise InvalidInputError(f"--base {base}: a {type(pipe).__name__}; personalisation trains a UNet LoRA, so it "
                                "needs a Stable Diffusion pipeline folder such as runs/demo-sd/pipeline (make demo-sd)")
    size = pipe.default_size
    round_trips = {colour: vae_round_trip(pipe, colour, size) for colour in NEW_COLOURS}
    if settings.colour == "auto":
        settings = replace(settings, colour=max(round_trips, key=round_trips.get))
    new_prompts, old = concept_prompts(settings.colour), heldout_prompts()
    before_new = score_concept(
        sample(pipe, new_prompts, settings, size), new_prompts * settings.eval_seeds, settings.colour
    )
    before_old = judge.score(sample(pipe, old, settings, size), old * settings.eval_seeds)

    data = write_concept_folder(out / "data", settings.colour, settings.num_images, size, settings.seed)
    cfg = lora_run_config(settings, data, out, size)
    start = time.perf_counter()
    seed_everything(cfg.seed)  # lora_A's random initialisation
    task = LoraTask(LatentDiffusionTask(cfg, pipe=pipe), cfg.model.lora)
    if cfg.model.lora.prior is not None:
        # class images drawn with seed 0 whatever the training seed (docs/LORA.md measured it so)
        task = PriorPreservationTask(task, cfg.model.lora.prior, seed=0)
    train(cfg, task)
    seconds = time.perf_counter() - start
    lora_path = task.export(out)

    tuned = load_pipeline(resolve_base(base))
    load_lora(tuned, lora_path, scale=settings.scale)
    after_new = score_concept(
        sample(tuned, new_prompts, settings, size), new_prompts * settings.eval_seeds, settings.colour
    )
    after_old = judge.score(sample(tuned, old, settings, size), old * settings.eval_seeds)
    results = {
        "colour": settings.colour, "training_images": settings.num_images, "train_seconds": round(seconds, 1),
        "vae_round_trip": round_trips[settings.colour], "vae_round_trips": round_trips,
        "new_concept": {"base": before_new, "lora": after_new},
        "old_concepts_heldout": {"base": before_old, "lora": after_old},
        "lora_bytes": lora_path.stat().st_size, "unet_bytes": unet_bytes(resolve_base(base)),
        "settings": vars(settings),
    }  # fmt: skip
    results["lora_share_of_unet"] = results["lora_bytes"] / max(results["unet_bytes"], 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def unet_bytes(base: Path) -> int:
    """Size of the base UNet weights file(s) (what the LoRA is compared with)."""
    folder = base / "unet" if base.is_dir() else base
    if folder.is_file():
        return folder.stat().st_size
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
