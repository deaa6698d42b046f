"""Run logging on rank 0: console lines, TensorBoard scalars/images (OUT_DIR/tb), `loss.png`, sample grids.

Images are written atomically (`t2i.atomic.save_image`): a full disk leaves the previous `loss.png`
intact and prints one warning line naming the path and the bytes needed; the run goes on (its next checkpoint
will stop it with `DiskFullError` if the disk stays full).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from t2i.atomic import save_image
from t2i.data.grid import make_grid
from t2i.errors import DiskFullError

log = logging.getLogger("t2i.train")


class RunLogger:
    """Writes scalars to the console and TensorBoard, redraws the loss curve, saves sample grids.

    Console output goes through `tqdm.write` when a progress bar is active, so lines do not tear the bar.
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, progress: Any = None):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.progress = progress
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.out_dir / "tb"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One console line and one TensorBoard scalar per value."""
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        self.print(f"step {step}: " + " ".join(f"{k}={_fmt(v)}" for k, v in values.items()))

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.write(line)
        else:
            print(line, flush=True)

    def loss_curve(self, steps: Sequence[int], losses: Sequence[float]) -> Path | None:
        """Redraw OUT_DIR/loss.png from the whole loss history."""
        if not self.enabled or not losses:
            return None
        return self._save(draw_loss_curve(steps, losses), self.out_dir / "loss.png")

    def samples(self, step: int, images: list[Image.Image], prompts: list[str]) -> Path | None:
        """Save OUT_DIR/samples/step_000100.png (captioned grid) and log it to TensorBoard."""
        if not self.enabled or not images:
            return None
        grid = make_grid(images, captions=prompts if len(prompts) == len(images) else None)
        path = self.out_dir / "samples" / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        saved = self._save(grid, path)
        self.writer.add_image("samples", np.asarray(grid.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()
        return saved

    def _save(self, image: Image.Image, path: Path) -> Path | None:
        """Write `image` atomically; on a full disk print a warning and keep the old file."""
        try:
            return save_image(image, path)
        except DiskFullError as err:
            self.print(f"warning: {err}; {path.name} not updated")
            return None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.3e}"


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (the first points average what exists)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def draw_loss_curve(
    steps: Sequence[int], losses: Sequence[float], size: tuple[int, int] = (640, 360)
) -> Image.Image:
    """Loss against step drawn with PIL: raw losses in light grey, a moving average in blue, min/max labels.

    The y axis is logarithmic when every loss is positive and they span more than a factor of 10.
    """
    width, height = size
    left, right, top, bottom = 60, 15, 15, 30
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    finite = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    if not finite:
        draw.text((left + 10, top + 10), "no finite loss yet", fill=(200, 0, 0), font=font)
        return image
    xs, ys = [s for s, _ in finite], [v for _, v in finite]
    log_y = min(ys) > 0 and max(ys) / min(ys) > 10
    transform = math.log10 if log_y else (lambda v: v)
    y_lo, y_hi = transform(min(ys)), transform(max(ys))
    y_span, x_span = (y_hi - y_lo) or 1.0, (xs[-1] - xs[0]) or 1

    def to_px(step: float, value: float) -> tuple[float, float]:
        px = left + (step - xs[0]) / x_span * (width - left - right)
        py = height - bottom - (transform(value) - y_lo) / y_span * (height - top - bottom)
        return px, py

    if len(xs) > 1:
        draw.line([to_px(s, v) for s, v in finite], fill=(190, 190, 190), width=1)
        draw.line([to_px(s, v) for s, v in zip(xs, smooth(ys, max(1, len(ys) // 20)))], fill=(30, 90, 200), width=2)
    else:
        x, y = to_px(xs[0], ys[0])
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(30, 90, 200))
    draw.text((4, top), _fmt(max(ys)), fill=(0, 0, 0), font=font)
    draw.text((4, height - bottom - 10), _fmt(min(ys)), fill=(0, 0, 0), font=font)
    draw.text((left, height - bottom + 6), str(xs[0]), fill=(0, 0, 0), font=font)
    draw.text((width - right - 40, height - bottom + 6), str(xs[-1]), fill=(0, 0, 0), font=font)
    label = "loss (log scale)" if log_y else "loss"
    draw.text((width // 2 - 40, height - bottom + 6), f"step   {label}", fill=(0, 0, 0), font=font)
    return image
