"""Image sets to evaluate or compare against: plain image folders, webdataset shards, image folders with
``metadata.jsonl``, and prompt files.

A source is a path string:
- a directory of image files (searched recursively, sorted by path); ``name.txt`` beside ``name.png`` is its
  caption (the kohya / img2dataset-folder convention);
- a directory with ``metadata.jsonl`` or ``*.tar`` shards, a tar path, a glob or a brace pattern: read with
  `t2i.data.sources` (captions found as `t2i.data.readers.caption_of` finds them: ``.txt``, ``.json`` caption,
  ``.caption``, or the folder's ``caption`` / ``text`` column).
Images that cannot be decoded are skipped and counted in the `DataStats` passed in, never raised.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from t2i.data.readers import CAPTION_KEYS, IMAGE_KEYS, caption_of
from t2i.data.sources import METADATA_FILE, iter_unit, resolve_sources
from t2i.data.stats import BadSample, DataStats
from t2i.data.transforms import decode_image
from t2i.errors import DataError, InvalidInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ImageItem:
    image: Image.Image
    caption: str | None
    key: str


def _is_plain_folder(path: str) -> bool:
    folder = Path(path)
    return folder.is_dir() and not (folder / METADATA_FILE).is_file() and not any(folder.glob("*.tar"))


def _folder_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(
            f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}), metadata.jsonl or *.tar shards found"
        )
    return files


def _read_folder(folder: Path, stats: DataStats) -> Iterator[ImageItem]:
    for path in _folder_files(folder):
        try:
            image = decode_image(path.read_bytes())
        except Exception as exc:  # noqa: BLE001 -- PIL raises many exception types for bad bytes
            stats.add("undecodable", f"{path}: {exc}")
            continue
        caption_file = path.with_suffix(".txt")
        caption = (
            caption_file.read_text(encoding="utf-8", errors="replace").strip()
            if caption_file.is_file()
            else None
        )
        yield ImageItem(image, caption, str(path.relative_to(folder).with_suffix("")))


def _raw_image(raw: dict) -> bytes | None:
    for ext in IMAGE_KEYS:
        if ext in raw:
            return raw[ext]
    if "__path__" in raw and os.path.isfile(raw["__path__"]):
        return Path(raw["__path__"]).read_bytes()
    return None


def _raw_caption(raw: dict) -> str | None:
    """The sample's caption as the training readers find it (`data.caption_key` defaults), or None."""
    try:
        return caption_of(raw, CAPTION_KEYS)
    except BadSample:  # no caption, or one that is not UTF-8: an uncaptioned image here
        return None


def _read_shards(source: str, stats: DataStats) -> Iterator[ImageItem]:
    for unit in resolve_sources(source, stats):
        for raw in iter_unit(unit, stats):
            if "__bad__" in raw:
                stats.add(raw["__bad__"], f"{raw['__url__']}: {raw['__key__']}")
                continue
            data = _raw_image(raw)
            if data is None:
                stats.add("missing_image", f"{raw['__url__']}: {raw['__key__']} has no image")
                continue
            try:
                image = decode_image(data)
            except Exception as exc:  # noqa: BLE001
                stats.add("undecodable", f"{raw['__url__']}: {raw['__key__']}: {exc}")
                continue
            yield ImageItem(image, _raw_caption(raw), raw["__key__"])


def iter_images(
    source: str | Path, stats: DataStats | None = None, limit: int | None = None
) -> Iterator[ImageItem]:
    """The images of `source` (see the module docstring), at most `limit`; bad ones are counted in `stats`.

    Raises DataError when `source` names nothing readable (a missing path, a folder without images).
    """
    stats = stats if stats is not None else DataStats()
    source = str(source)
    items = _read_folder(Path(source), stats) if _is_plain_folder(source) else _read_shards(source, stats)
    for count, item in enumerate(items):
        if limit is not None and count >= limit:
            return
        yield item


def count_images(source: str | Path) -> int | None:
    """The number of images a plain folder holds (for progress bars); None for shards (unknown up front)."""
    source = str(source)
    return len(_folder_files(Path(source))) if _is_plain_folder(source) else None


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one per non-empty line; InvalidInputError for a missing or empty file."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(
            f"{path}: prompts file not found; expected a text file with one prompt per line"
        )
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise InvalidInputError(f"{path}: prompts file has no prompts; expected one prompt per line")
    return prompts
