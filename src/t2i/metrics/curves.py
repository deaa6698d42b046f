"""The evaluation history of a run (``OUT/eval.json``) and its curves (``OUT/eval.png``), both written atomically."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from t2i.errors import DataError
from t2i.metrics.files import atomic_save_png, atomic_write_text

_PANEL = (640, 150)
_MARGIN = {"left": 64, "right": 16, "top": 20, "bottom": 22}
_COLOURS = [(30, 90, 200), (200, 70, 30), (40, 150, 60), (140, 60, 170), (190, 140, 20), (20, 150, 160)]


@dataclass
class EvalHistory:
    """Metric values by step. ``values[name][i]`` belongs to ``steps[i]`` (NaN where a metric was not run)."""

    steps: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, step: int, metrics: dict[str, float]) -> None:
        """Record `metrics` at `step`; entries at or after `step` are dropped first (a resumed run redoes them)."""
        keep = [i for i, s in enumerate(self.steps) if s < step]
        self.steps = [self.steps[i] for i in keep] + [step]
        names = list(self.values) + [name for name in metrics if name not in self.values]
        self.values = {
            name: [self.values[name][i] for i in keep] if name in self.values else [math.nan] * len(keep)
            for name in names
        }
        for name in names:
            self.values[name].append(float(metrics.get(name, math.nan)))

    def save(self, path: str | Path) -> Path:
        data = {"steps": self.steps, "values": {k: [None if math.isnan(v) else v for v in vs]
                                                 for k, vs in self.values.items()}}  # fmt: skip
        return atomic_write_text(path, json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> EvalHistory:
        """Read a history written by `save`; a missing file is an empty history."""
        path = Path(path)
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
            steps = [int(s) for s in data["steps"]]
            values = {
                k: [math.nan if v is None else float(v) for v in vs] for k, vs in data["values"].items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(
                f"{path}: not an evaluation history ({exc.__class__.__name__}); move it away"
            ) from exc
        if any(len(vs) != len(steps) for vs in values.values()):
            raise DataError(f"{path}: metric lists and steps differ in length; move it away")
        return cls(steps, values)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"


def _draw_panel(draw: ImageDraw.ImageDraw, top: int, name: str, steps: list[int], values: list[float],
                colour: tuple[int, int, int], step_range: tuple[int, int]) -> None:  # fmt: skip
    width, height = _PANEL
    font = ImageFont.load_default()
    x0, x1 = _MARGIN["left"], width - _MARGIN["right"]
    y0, y1 = top + _MARGIN["top"], top + height - _MARGIN["bottom"]
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    draw.text((x0, top + 4), name, fill=colour, font=font)
    points = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    if not points:
        draw.text((x0 + 8, y0 + 8), "no value yet", fill=(200, 0, 0), font=font)
        return
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    if hi == lo:  # a constant series sits mid-panel
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    span, step_span = (hi - lo) or 1.0, (step_range[1] - step_range[0]) or 1

    def to_px(step: float, value: float) -> tuple[float, float]:
        return (x0 + (step - step_range[0]) / step_span * (x1 - x0), y1 - (value - lo) / span * (y1 - y0))

    pixels = [to_px(s, v) for s, v in points]
    if len(pixels) > 1:
        draw.line(pixels, fill=colour, width=2)
    for x, y in pixels:
        draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour)
    draw.text((4, y0), _fmt(hi), fill=(0, 0, 0), font=font)
    draw.text((4, y1 - 10), _fmt(lo), fill=(0, 0, 0), font=font)
    draw.text((x1 - 150, top + 4), f"last {_fmt(points[-1][1])} @ {points[-1][0]}", fill=(0, 0, 0), font=font)


def draw_eval_curves(history: EvalHistory) -> Image.Image:
    """One panel per metric (value against step, own y range), stacked; the step axis is shared."""
    names = sorted(history.values) or ["(no metrics)"]
    width, height = _PANEL
    image = Image.new("RGB", (width, height * len(names) + 14), "white")
    draw = ImageDraw.Draw(image)
    step_range = (min(history.steps), max(history.steps)) if history.steps else (0, 1)
    for i, name in enumerate(names):
        colour = _COLOURS[i % len(_COLOURS)]
        _draw_panel(draw, i * height, name, history.steps, history.values.get(name, []), colour, step_range)
    font = ImageFont.load_default()
    bottom = height * len(names)
    draw.text((_MARGIN["left"], bottom), f"step {step_range[0]}", fill=(0, 0, 0), font=font)
    draw.text((width - _MARGIN["right"] - 70, bottom), f"step {step_range[1]}", fill=(0, 0, 0), font=font)
    return image


def write_eval_curves(history: EvalHistory, path: str | Path) -> Path:
    """Draw `history` and write it to `path` (PNG) atomically."""
    return atomic_save_png(path, draw_eval_curves(history))
