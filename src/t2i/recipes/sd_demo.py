"""The latent CPU demos (`t2i demo`: the flow family, `make demo`; `t2i demo --family sd`): train a tiny
text-to-image model from nothing and score it. The default trains a Flux-shaped transformer with flow matching
(`configs/demo/shapes-flow.yaml`); `--family sd` swaps in a latent UNet (`configs/demo/shapes-ldm.yaml`) and keeps
every other phase, so the two families are compared on one task.

Phases (each timed):
1. data     write captioned-shapes shards (32x32, training split: held-out combinations never appear);
2. vae      train the small AutoencoderKL of `configs/demo/shapes-vae.yaml`, export it as a VAE folder;
3. precache encode every image (VAE moments) and caption (MiniLM token embeddings) once;
4. unet     train the latent UNet of `configs/demo/shapes-ldm.yaml` (flow: `transformer`, the transformer of
            `configs/demo/shapes-flow.yaml`) from the precached shards;
5. eval     sample every held-out prompt (several seeds) with CFG, score colour / shape / position with the
            analytic judge, write `grid.png` and `results.json`, export the pipeline folder;
6. check    score the exported folder again as a user loads it (`t2i.load_pipeline(...).generate`, seeds the eval
            never draws): `results.json`'s `public_api_check`, printed with its largest gap to the eval.
`DemoSettings.quick()` shrinks every phase to a smoke test (seconds, not minutes; the accuracy is meaningless).
Every phase builds its task from a config with `build_task`, as `t2i train` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from t2i.recipes.demo_common import (
    PAIR_TARGETS,
    PhaseTimer,
    check_through_public_api,
    make_pairs_data,
    make_shapes_data,
    score_heldout,
    write_results,
)

FLOW_CONFIG = "demo/shapes-flow"
FLOW_STEPS = 2000
TWO_OBJECT_FLOW_STEPS = 4000


@dataclass
class DemoSettings:
    """Sizes of each phase; `quick()` is the smoke-test version."""

    num_images: int = 6000
    image_size: int = 32
    vae_steps: int = 600
    unet_steps: int = 3000  # seeded initialisation: 2600 steps gave held-out colour 88.6%, 3000 90.9%, 3200 94.3%
    precache_batch: int = 128
    seed: int = 0  # the training seed of the VAE and the denoiser (the dataset and eval seeds stay fixed)
    eval_seeds: int = 16  # 22 held-out prompts x 16 = 352 samples: one sample is 0.3 points, not 1.1
    sample_steps: int = 25
    guidance_scale: float = 4.0
    threads: int | None = None  # None: one per idle core, measured before each phase (`auto_threads`)
    vae_overrides: list[str] = field(default_factory=list)
    unet_overrides: list[str] = field(default_factory=list)
    model_config: str = "demo/shapes-ldm"  # the denoiser phase's config (`demo/shapes-flow`: the flow family)
    task: str = "single"  # `two-objects`: two shapes per image, scored on binding and relation

    def for_two_objects(self) -> DemoSettings:
        """The same recipe on the two-object scenes: captions need 16 tokens (the longest is 15), and the flow
        transformer trains twice as long (20 minutes of compute is the task's budget)."""
        self.task = "two-objects"
        key = "model.context_encoder" if self.is_flow else "model.cond_stage_config"
        self.unet_overrides = [*self.unet_overrides, f"{key}.max_length=16", "trainer.eval.task=two-objects"]
        if self.is_flow and self.unet_steps == FLOW_STEPS:
            self.unet_steps = TWO_OBJECT_FLOW_STEPS
        return self

    @property
    def is_flow(self) -> bool:
        return self.model_config == FLOW_CONFIG

    @classmethod
    def flow(cls, quick: bool = False) -> DemoSettings:
        """The flow family's demo: the same phases with the transformer of `demo/shapes-flow`."""
        settings = cls.quick() if quick else cls(unet_steps=FLOW_STEPS)
        settings.model_config = FLOW_CONFIG
        if quick:
            settings.unet_overrides = ["data.batch_size=8", "model.first_stage_config.ddconfig.ch_mult=[1,2]",
                                       "model.transformer_config.hidden_size=32",
                                       "model.transformer_config.axes_dim=[2,2,4]"]  # fmt: skip
        return settings

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(num_images=32, vae_steps=2, unet_steps=2, precache_batch=32, eval_seeds=1, sample_steps=2,
                   vae_overrides=["data.batch_size=8", "model.ddconfig.ch_mult=[1,2]"],
                   unet_overrides=["data.batch_size=8", "model.unet_config.channel_mult=[1]",
                                   "model.unet_config.attention_resolutions=[1]",
                                   "model.first_stage_config.ddconfig.ch_mult=[1,2]",
                                   "model.unet_config.image_size=16"])


def run_demo(out: Path, settings: DemoSettings) -> dict[str, Any]:
    """Run the five phases into `out`; returns the results written to `out/results.json`."""
    out.mkdir(parents=True, exist_ok=True)
    timer = PhaseTimer(settings.threads)
    make_data = make_pairs_data if settings.task == "two-objects" else make_shapes_data
    shards = timer.run("data", make_data, out / "data", settings.num_images, settings.image_size)
    vae_dir = timer.run("vae", train_vae, out, shards, settings)
    stats = timer.run("precache", precache_latents, out, shards, vae_dir, settings)
    task = timer.run("transformer" if settings.is_flow else "unet", train_unet, out, vae_dir, stats["scale_factor"],
                     settings)  # fmt: skip
    scores = timer.run("eval", evaluate, out, task, settings)
    check = timer.run("check", check_through_public_api, out / "pipeline", settings.eval_seeds, settings.task,
                      out / "grid_check.png", steps=settings.sample_steps, guidance_scale=settings.guidance_scale)
    targets = PAIR_TARGETS if settings.task == "two-objects" else None
    return write_results(out, scores, timer, vars(settings), targets, check, grid=out / "grid.png",
                         pipeline=out / "pipeline")


def _config(name: str, overrides: list[str]) -> Any:
    from t2i.config import load_config

    return load_config(name, overrides)


def train_vae(out: Path, shards: str, settings: DemoSettings) -> Path:
    """Train the demo VAE; export it (diffusers VAE folder) to out/vae/export."""
    from t2i.train.task import build_task
    from t2i.train.trainer import train

    cfg = _config("demo/shapes-vae", [f"data.train={shards}", f"data.resolution={settings.image_size}",
                                      f"trainer.max_steps={settings.vae_steps}", f"trainer.out_dir={out / 'vae'}",
                                      f"seed={settings.seed}", *settings.vae_overrides])
    task = build_task(cfg)
    train(cfg, task)
    task.eval()
    return task.export(out / "vae" / "export")


def _ldm_overrides(vae_dir: Path, settings: DemoSettings, extra: list[str]) -> list[str]:
    return [f"model.first_stage_config.from_pretrained={vae_dir}", f"data.resolution={settings.image_size}",
            *settings.unet_overrides, *extra]


def precache_latents(out: Path, shards: str, vae_dir: Path, settings: DemoSettings) -> dict[str, Any]:
    from t2i.train.precache import precache

    cfg = _config(settings.model_config, _ldm_overrides(vae_dir, settings, [f"data.train={shards}"]))
    return precache(cfg, out / "latents", settings.precache_batch, shard_size=2000, dtype="float16")


def train_unet(out: Path, vae_dir: Path, scale_factor: float, settings: DemoSettings) -> Any:
    from t2i.train.task import build_task
    from t2i.train.trainer import train

    cfg = _config(settings.model_config, _ldm_overrides(vae_dir, settings, [
        f"data.train={out / 'latents'}", f"model.scale_factor={scale_factor:.6f}",
        f"trainer.max_steps={settings.unet_steps}", f"trainer.out_dir={out / 'unet'}",
        f"trainer.sample.steps={settings.sample_steps}", f"trainer.sample.guidance_scale={settings.guidance_scale}",
        f"seed={settings.seed}"]))
    task = build_task(cfg)
    train(cfg, task)
    return task


def evaluate(out: Path, task: Any, settings: DemoSettings) -> dict[str, float]:
    """Judge samples of every held-out prompt (EMA weights); write grid.png and export the pipeline."""
    import torch

    task.eval()
    with task.ema_weights(True), torch.no_grad():
        scores = score_heldout(task.sample_images, settings.eval_seeds, out / "grid.png", settings.task)
    task.export(out / "pipeline", use_ema=True)
    return scores
