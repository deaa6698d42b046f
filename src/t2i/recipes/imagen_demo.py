"""The Imagen-family CPU demo (`t2i demo --family imagen`): a 16 px base stage and a 16 -> 32 px super-resolution
stage trained from precached pixels and MiniLM embeddings, sampled as a cascade and scored by the shapes judge.

Phases: data, precache, base, sr, eval (each timed). Each stage is built from its config with `build_task`; its
sampling recipe (sampler, steps, guidance) is `trainer.sample`, which also becomes the exported stage's default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from t2i.recipes.demo_common import PhaseTimer, make_shapes_data, score_heldout, write_results


@dataclass
class ImagenDemoSettings:
    """Sizes of each phase and the sampling recipe; `quick()` is the smoke-test version."""

    num_images: int = 6000
    image_size: int = 32
    base_steps: int = 2400
    sr_steps: int = 500
    eval_seeds: int = 16  # 22 held-out prompts x 16 = 352 samples, as the latent demos
    # measured on held-out prompts (docs/DEMO_IMAGEN.md): DPM-Solver++ beat 18 EDM Heun steps on the base, and
    # the SR stage's ancestral noise removes the texture a deterministic ODE solve leaves inside flat shapes
    sample_steps: list[int] = field(default_factory=lambda: [30, 30])
    sampler: list[str] = field(default_factory=lambda: ["dpmpp_2m", "euler_ancestral"])
    guidance_scale: list[float] = field(default_factory=lambda: [3.0, 3.0])
    aug_level: float = 0.002
    threads: int | None = None  # None: one per idle core, measured before each phase (`auto_threads`)
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

    settings = settings or (ImagenDemoSettings.quick() if quick else ImagenDemoSettings())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timer = PhaseTimer(settings.threads)
    shards = timer.run("data", make_shapes_data, out / "data", settings.num_images, settings.image_size)
    timer.run("precache", precache, out, shards, settings)
    timer.run("base", train_stage, out, "base", settings)
    timer.run("sr", train_stage, out, "sr", settings)
    scores = timer.run("eval", evaluate, out, settings)
    return write_results(out, scores, timer, asdict(settings), grid=out / "grid.png", cascade=out / "cascade")


def stage_config(name: str, settings: ImagenDemoSettings, extra: list[str]) -> Any:
    """The demo config of stage `name` (base | sr) with the settings' overrides and `extra`."""
    from t2i.config import load_config

    overrides = settings.base_overrides if name == "base" else settings.sr_overrides
    return load_config(
        f"demo/shapes-imagen-{name}", [f"data.resolution={settings.image_size}", *overrides, *extra]
    )


def precache(out: Path, shards: str, settings: ImagenDemoSettings) -> dict[str, Any]:
    from t2i.train.precache import precache_imagen

    cfg = stage_config("sr", settings, [f"data.train={shards}"])
    return precache_imagen(cfg, out / "precached", batch_size=256, shard_size=2000)


def train_stage(out: Path, name: str, settings: ImagenDemoSettings) -> Path:
    """Train stage `name` from the precached shards; export it to out/cascade/<name>."""
    from t2i.train.task import build_task
    from t2i.train.trainer import train

    i = 0 if name == "base" else 1
    steps = settings.base_steps if name == "base" else settings.sr_steps
    cfg = stage_config(name, settings, [
        f"data.train={out / 'precached'}", f"trainer.max_steps={steps}", f"trainer.out_dir={out / name}",
        f"trainer.sample.sampler={settings.sampler[i]}", f"trainer.sample.steps={settings.sample_steps[i]}",
        f"trainer.sample.guidance_scale={settings.guidance_scale[i]}"])  # fmt: skip
    task = build_task(cfg)
    train(cfg, task)
    task.eval()
    return task.export(out / "cascade" / name, use_ema=True)


def evaluate(out: Path, settings: ImagenDemoSettings) -> dict[str, float]:
    """Sample every held-out prompt with the exported cascade; judge the final images; write grid.png."""
    from t2i.pipelines.cascade import load_cascade, write_cascade_index

    write_cascade_index(out / "cascade", ["base", "sr"])
    cascade = load_cascade(out / "cascade", device="cpu")
    return score_heldout(
        lambda prompts, seed: cascade.generate(prompts, seed=seed, aug_level=settings.aug_level).images,
        settings.eval_seeds, out / "grid.png",
    )  # fmt: skip
