"""`t2i demo --family imagen`: train a tiny Imagen cascade (16 px base + 16 -> 32 px SR) on CPU and score it.

Phases (each timed):
1. data     captioned-shapes shards at 32 px (training split: held-out combinations never appear);
2. precache pixels + MiniLM token embeddings, once, for both stages;
3. base     the 16 px base stage (`configs/demo/shapes-imagen-base.yaml`), EDM;
4. sr       the 16 -> 32 px SR stage (`configs/demo/shapes-imagen-sr.yaml`: Regular UNet as `sr-unet`, EDM,
            noise conditioning augmentation off); both are exported into one cascade folder (`out/cascade`, loadable with
            `t2i.load_cascade`);
5. eval     the cascade samples every held-out prompt (several seeds); the analytic judge scores colour, shape
            and position of the final 32 px images; `grid.png` and `results.json` are written.
`quick=True` shrinks every phase to a smoke test (seconds; the accuracy is then meaningless).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TARGETS = {"colour": 0.90, "shape": 0.80, "position": 0.70}


@dataclass
class ImagenDemoSettings:
    """Sizes of each phase and the sampling recipe; `quick()` is the smoke-test version."""

    num_images: int = 6000
    image_size: int = 32
    base_steps: int = 2400
    sr_steps: int = 500
    eval_seeds: int = 4
    # measured on held-out prompts (docs/DEMO_IMAGEN.md): DPM-Solver++ beat 18 EDM Heun steps on the base, and
    # the SR stage's ancestral noise removes the texture a deterministic ODE solve leaves inside flat shapes
    sample_steps: list[int] = field(default_factory=lambda: [30, 30])
    sampler: list[str] = field(default_factory=lambda: ["dpmpp_2m", "euler_ancestral"])
    guidance_scale: list[float] = field(default_factory=lambda: [3.0, 3.0])
    aug_level: float = 0.002
    threads: int = 1  # one thread: on a busy 2-core machine two threads per process slow training ~40x
    base_overrides: list[str] = field(default_factory=list)
    sr_overrides: list[str] = field(default_factory=list)

    @classmethod
    def quick(cls) -> ImagenDemoSettings:
        tiny = [
            "data.batch_size=8",
            "data.shuffle_buffer=8",
            "model.unet.embed_dim=8",
            "model.unet.num_attn_heads=1",
            "model.unet.per_head_channels=8",
        ]
        return cls(
            num_images=48,
            base_steps=2,
            sr_steps=2,
            eval_seeds=1,
            sample_steps=[2, 2],
            base_overrides=[*tiny, "model.unet.cond_dim=16"],
            sr_overrides=[*tiny, "model.unet.cond_dim=16"],
        )


def run_imagen_demo(
    out: str | Path, quick: bool = False, settings: ImagenDemoSettings | None = None
) -> dict[str, Any]:
    """Run the five phases into `out`; returns the results also written to `out/results.json`."""
    import torch

    from t2i.cli.demo import PhaseTimer

    settings = settings or (ImagenDemoSettings.quick() if quick else ImagenDemoSettings())
    torch.set_num_threads(settings.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timer = PhaseTimer()
    shards = timer.run("data", make_data, out / "data", settings)
    timer.run("precache", precache, out, shards, settings)
    timer.run("base", train_stage, out, "base", settings)
    timer.run("sr", train_stage, out, "sr", settings)
    scores = timer.run("eval", evaluate, out, settings)
    results = {
        "accuracy": scores,
        "targets": TARGETS,
        "seconds": timer.seconds,
        "total_seconds": timer.total,
        "settings": {k: v for k, v in asdict(settings).items() if not k.endswith("overrides")},
        "grid": str(out / "grid.png"),
        "cascade": str(out / "cascade"),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def make_data(folder: Path, settings: ImagenDemoSettings) -> str:
    from t2i.data.shapes import write_shapes_dataset

    paths = write_shapes_dataset(folder, settings.num_images, settings.image_size, seed=0, shard_size=2000)
    return str(folder / f"shapes-{{00000..{len(paths) - 1:05d}}}.tar")


def stage_config(name: str, settings: ImagenDemoSettings, extra: list[str]) -> Any:
    """The demo config of stage `name` (base | sr) with the settings' overrides and `extra`."""
    from t2i.config import load_config

    overrides = settings.base_overrides if name == "base" else settings.sr_overrides
    return load_config(
        f"demo/shapes-imagen-{name}", [f"data.resolution={settings.image_size}", *overrides, *extra]
    )


def precache(out: Path, shards: str, settings: ImagenDemoSettings) -> dict[str, Any]:
    from t2i.train.tasks.imagen_precache import precache_imagen

    cfg = stage_config("sr", settings, [f"data.train={shards}"])
    return precache_imagen(cfg, out / "precached", batch_size=256, shard_size=2000)


def _stage_defaults(name: str, settings: ImagenDemoSettings) -> Any:
    from t2i.pipelines.imagen_stage import StageDefaults

    i = 0 if name == "base" else 1
    return StageDefaults(
        sampler=settings.sampler[i],
        steps=settings.sample_steps[i],
        guidance_scale=settings.guidance_scale[i],
        aug_level=None if name == "base" else settings.aug_level,
    )


def train_stage(out: Path, name: str, settings: ImagenDemoSettings) -> Path:
    """Train stage `name` from the precached shards; export it to out/cascade/<name>."""
    from t2i.train.task import seed_everything
    from t2i.train.tasks.imagen import ImagenTask
    from t2i.train.trainer import train

    steps = settings.base_steps if name == "base" else settings.sr_steps
    cfg = stage_config(
        name,
        settings,
        [f"data.train={out / 'precached'}", f"trainer.max_steps={steps}", f"trainer.out_dir={out / name}"],
    )
    seed_everything(cfg.seed)  # the stage's initialisation, reproducible from run to run
    task = ImagenTask(cfg, _stage_defaults(name, settings))
    train(cfg, task)
    task.eval()
    return task.export(out / "cascade" / name, use_ema=True)


def evaluate(out: Path, settings: ImagenDemoSettings) -> dict[str, float]:
    """Sample every held-out prompt with the exported cascade; judge the final images; write grid.png."""
    from t2i.data import judge
    from t2i.data.grid import make_grid
    from t2i.data.shapes import heldout_prompts
    from t2i.pipelines.cascade import load_cascade, write_cascade_index

    write_cascade_index(out / "cascade", ["base", "sr"])
    cascade = load_cascade(out / "cascade", device="cpu")
    prompts = heldout_prompts()
    images: list[Any] = []
    for seed in range(settings.eval_seeds):
        images += cascade.generate(prompts, seed=1000 + seed).images
    scores = judge.score(images, prompts * settings.eval_seeds)
    shown = [im.resize((im.width * 2, im.height * 2), 0) for im in images[: len(prompts)]]
    make_grid(shown, prompts, ncols=11).save(out / "grid.png", optimize=True)
    return scores


def format_summary(results: dict[str, Any]) -> str:
    """Accuracy per attribute against the targets, and the wall time per phase."""
    acc, seconds = results["accuracy"], results["seconds"]
    marks = {k: "ok" if acc[k] >= v else "BELOW TARGET" for k, v in TARGETS.items()}
    return "\n".join(
        [
            f"held-out prompts: {int(acc['n'])} samples",
            *(f"  {k:<9}{acc[k]:6.1%}  (target >= {TARGETS[k]:.0%}, {marks[k]})" for k in TARGETS),
            f"  all three{acc['all']:6.1%}",
            "wall time: "
            + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items())
            + f"; total {results['total_seconds']:.0f}s",
            f"grid: {results['grid']}   cascade: {results['cascade']}",
        ]
    )
