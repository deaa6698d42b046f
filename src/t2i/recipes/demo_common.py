"""What the CPU demos of every family share: the shapes data, phase timing, the judge's scoring of held-out
prompts, the sample grid, the results file and the summary printed at the end."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Held-out accuracy every demo is measured against (colour, shape, position of prompts never trained on): the
# time-to-quality bar that the default demo (`make demo`) must reach within 10 minutes of compute on 2 cores.
TARGETS = {"colour": 0.95, "shape": 0.90, "position": 0.90}
# The two-object task (`t2i demo --task two-objects`): held-out prompts drawn fully right (both objects with their
# colour and shape, in the right relation).
PAIR_TARGETS = {"all": 0.80}


def _usable_cores() -> int:
    import os

    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, psutil.cpu_count(logical=False) or cores)  # hyperthreads add nothing to these kernels


def idle_cores(sample_seconds: float = 0.5) -> float:
    """How many cores other work left idle over the last `sample_seconds` (of those this process may use)."""
    import psutil

    busy = psutil.cpu_percent(interval=sample_seconds) / 100.0  # every CPU of the machine, averaged
    return _usable_cores() * (1.0 - busy)


def auto_threads() -> int:
    """Torch threads for the next phase: one per idle physical core, at least one.

    OpenMP threads spin and wait for each other, so a thread that shares its core with another job stalls every
    step of the rest: on a 2-core box with one other job running, two threads trained several times slower than
    one (docs/DEMO.md).
    """
    return max(1, min(_usable_cores(), int(idle_cores() + 0.25)))


class PhaseTimer:
    """Wall time per phase, printed as each one ends; sets torch's thread count before each phase (`threads`
    None: `auto_threads`, measured then) and records it."""

    def __init__(self, threads: int | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.threads: dict[str, int] = {}
        self.fixed_threads = threads
        self.started = time.perf_counter()

    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        import torch

        self.threads[name] = self.fixed_threads or auto_threads()
        torch.set_num_threads(self.threads[name])
        print(f"== demo: {name} ({self.threads[name]} thread{'s' * (self.threads[name] > 1)}) ...", flush=True)
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - start, 1)
        print(f"== demo: {name} done in {self.seconds[name]:.1f} s", flush=True)
        return result

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.started, 1)


def make_shapes_data(folder: Path, num_images: int, image_size: int) -> str:
    """The captioned-shapes training split as webdataset shards; returns their brace pattern."""
    from t2i.data.shapes import write_shapes_dataset

    paths = write_shapes_dataset(folder, num_images, image_size, seed=0, shard_size=2000)
    return str(folder / f"shapes-{{00000..{len(paths) - 1:05d}}}.tar")


def make_pairs_data(folder: Path, num_images: int, image_size: int) -> str:
    """The two-object training split as webdataset shards; returns their brace pattern."""
    from t2i.data.shapes_pairs import write_pairs_dataset

    paths = write_pairs_dataset(folder, num_images, image_size, seed=0, shard_size=2000)
    return str(folder / f"shapes-{{00000..{len(paths) - 1:05d}}}.tar")


def score_heldout(
    sample: Callable[[list[str], int], list[Any]], seeds: int, grid: Path, task: str = "single"
) -> dict[str, float]:
    """Judge `sample(prompts, seed)` on every held-out prompt of `task` (`single` or `two-objects`) for `seeds`
    seeds; write the first seed's grid."""
    from t2i.data.grid import make_grid

    if task == "two-objects":
        from t2i.data.judge_pairs import score_pairs as judge_all
        from t2i.data.shapes_pairs import heldout_pair_prompts as heldout_prompts
    else:
        from t2i.data.judge import score as judge_all
        from t2i.data.shapes import heldout_prompts
    prompts = heldout_prompts()
    images: list[Any] = []
    for seed in range(seeds):
        for start in range(0, len(prompts), 32):  # bounded batches: the pair task has 96 prompts
            images += sample(prompts[start : start + 32], 1000 + seed)
    scores = judge_all(images, prompts * seeds)
    shown = [im.resize((im.width * 2, im.height * 2), 0) for im in images[: len(prompts)]]
    make_grid(shown, prompts, ncols=11 if task == "single" else 12).save(grid, optimize=True)
    return scores


def write_results(out: Path, scores: dict[str, float], timer: PhaseTimer, settings: dict,
                  targets: dict[str, float] | None = None, check: dict[str, float] | None = None,
                  **paths: Path) -> dict:
    """results.json: accuracy, targets, phase times and settings (and `check`: the same judge's scores of the
    exported pipeline through the public API); returns what it wrote."""
    results = {"accuracy": scores, "targets": targets or TARGETS, "seconds": timer.seconds,
               "total_seconds": timer.total, "threads": timer.threads,
               "settings": {k: v for k, v in settings.items() if not k.endswith("overrides")},
               **({"public_api_check": check} if check else {}),
               **{name: str(path) for name, path in paths.items()}}  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def format_summary(results: dict[str, Any], outputs: str) -> str:
    """Accuracy per attribute against the targets, the wall time per phase, and where the outputs are."""
    acc, seconds, targets = results["accuracy"], results["seconds"], results.get("targets", TARGETS)
    marks = {k: "ok" if acc[k] >= v else "BELOW TARGET" for k, v in targets.items()}
    others = [k for k in acc if k not in targets and k != "n"]
    return "\n".join(
        [
            f"held-out prompts: {int(acc['n'])} samples",
            *(f"  {k:<9}{acc[k]:6.1%}  (target >= {targets[k]:.0%}, {marks[k]})" for k in targets),
            *(f"  {k:<9}{acc[k]:6.1%}" for k in others),
            *_check_lines(acc, results.get("public_api_check")),
            "wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items())
            + f"; total {results['total_seconds']:.0f}s",
            outputs,
        ]
    )


def _check_lines(acc: dict[str, float], check: dict[str, float] | None) -> list[str]:
    if not check:
        return []
    keys = [k for k in check if k != "n" and k in acc]
    gap = max(abs(check[k] - acc[k]) for k in keys)
    return [f"public-API check (t2i.load_pipeline(...).generate, its own seeds, {int(check['n'])} samples): "
            + ", ".join(f"{k} {check[k]:.1%}" for k in keys) + f"; largest gap {100 * gap:.1f} points"]


def check_through_public_api(pipeline: Path, seeds: int, task: str, grid: Path, **generate: Any) -> dict[str, float]:
    """Score the exported pipeline again, as a user would load it: `t2i.load_pipeline(pipeline).generate` with
    seeds the demo's own evaluation never draws, and `generate`'s settings (steps, guidance_scale)."""
    import t2i

    pipe = t2i.load_pipeline(pipeline)

    def sample(prompts: list[str], seed: int) -> list[Any]:
        return pipe.generate(prompts, seed=seed + 10_000, progress=False, **generate).images

    return score_heldout(sample, seeds, grid, task)
