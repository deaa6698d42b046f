"""The metrics' file writes, through `t2i.atomic` (whole or not at all; a full disk is one line)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from t2i.atomic import atomic_write, save_image


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so that readers see the old file or the new one, never a partial one."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda handle: handle.write(data), needed=len(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_png(path: str | Path, image: Image.Image) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_image(image, Path(path).with_suffix(".png") if not str(path).endswith(".png") else path)
