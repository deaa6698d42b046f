"""Data sources: resolve shard patterns / image folders into units, and read raw samples from a unit.

A *source* is a string: a local tar path, a glob (``shards/*.tar``), a brace pattern
(``shards/{00000..00009}.tar``, expanded with webdataset's `expand_urls`), or a directory. A directory with a
``metadata.jsonl`` (lines ``{"file_name": ..., "text": ...}`` as in HF imagefolder; the caption may be any
column `caption_keys` name) is an image folder; any other directory stands for the ``*.tar`` files inside it.

A *raw sample* is a dict ``{"__key__", "__url__", EXT: bytes, ...}`` as webdataset groups tar members
(``{key}.jpg`` + ``{key}.txt`` -> ``{"jpg": ..., "txt": ...}``). Image-folder samples carry ``"__path__"``
(read lazily) instead of image bytes, and ``"__meta__"`` (their metadata.jsonl columns). A raw sample that is
already known to be bad carries ``"__bad__"`` (a reason from `REASONS`, with an optional ``"__detail__"``) so
that it is counted by whichever reader worker owns it.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from t2i.data.stats import DataStats
from t2i.errors import DataError

METADATA_FILE = "metadata.jsonl"
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Unit:
    """One readable unit of data: a tar shard or an image folder."""

    kind: str  # "tar" | "folder"
    path: str


def _expand_one(source: str) -> list[str]:
    from webdataset.shardlists import expand_urls

    paths: list[str] = []
    for expanded in expand_urls(source):
        if _GLOB_CHARS & set(expanded):
            paths += sorted(glob.glob(expanded))
        else:
            paths.append(expanded)
    return paths


def _directory_units(directory: Path) -> list[Unit]:
    if (directory / METADATA_FILE).is_file():
        return [Unit("folder", str(directory))]
    tars = sorted(str(p) for p in directory.glob("*.tar"))
    if not tars:
        raise DataError(
            f"data source {str(directory)!r}: directory has neither {METADATA_FILE} nor *.tar shards"
        )
    return [Unit("tar", p) for p in tars]


def resolve_sources(sources: str | Path | Sequence[str | Path], stats: DataStats) -> list[Unit]:
    """Expand `sources` into units; paths that do not exist are counted as ``unreadable_shard`` in `stats`.

    Raises DataError when a source matches no existing file at all (the message names the pattern).
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise DataError("data.train: no data sources given; expected shard paths, globs or an image folder")
    units: list[Unit] = []
    for source in sources:
        source = str(source)
        if os.path.isdir(source):
            units += _directory_units(Path(source))
            continue
        paths = _expand_one(source)
        existing = [p for p in paths if os.path.isfile(p)]
        if not existing:
            raise DataError(
                f"data source {source!r}: matches no files; expected tar shards, a glob or a folder"
            )
        for path in paths:
            if path in existing:
                units.append(Unit("tar", path))
            else:
                stats.add("unreadable_shard", "no such file", shard=path)
    return units


def iter_unit(unit: Unit, stats: DataStats, count_stream_errors: bool = True) -> Iterator[dict]:
    """Raw samples of one unit. Shard-level failures go into `stats` when `count_stream_errors`."""
    if unit.kind == "folder":
        yield from _iter_folder(Path(unit.path))
    else:
        yield from _iter_tar(unit.path, stats if count_stream_errors else DataStats())


def _iter_tar_members(path: str, stats: DataStats) -> Iterator[dict]:
    """``{"fname", "data"}`` per member; a broken stream ends the shard and is counted once."""
    from webdataset.tariterators import tar_file_iterator

    errors: list[Exception] = []
    seen = 0
    try:
        with open(path, "rb") as stream:
            for member in tar_file_iterator(stream, handler=lambda exn: errors.append(exn) and False):
                seen += 1
                yield member
    except (OSError, tarfile.TarError, EOFError) as exn:
        errors.append(exn)
    if errors:
        reason = "corrupt_member" if seen else "unreadable_shard"
        stats.add(reason, f"{path}: {errors[0]}", shard=path)


def _iter_tar(path: str, stats: DataStats) -> Iterator[dict]:
    """Group consecutive members sharing a key (``a/b.jpg``, ``a/b.txt``) into raw samples."""
    from webdataset.tariterators import base_plus_ext

    current: dict | None = None
    for member in _iter_tar_members(path, stats):
        key, ext = base_plus_ext(member["fname"])
        if key is None:
            continue
        ext = ext.lower()
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": path}
        if ext in current:
            current["__bad__"] = "corrupt_member"  # duplicate member name within one sample
        current[ext] = member["data"]
    if current is not None:
        yield current


def _iter_folder(directory: Path) -> Iterator[dict]:
    """Raw samples from ``metadata.jsonl``; image files are read later by the decoder.

    Each sample carries ``__path__`` (the image) and ``__meta__`` (the line's columns, where the caption
    keys are looked up). A line that is not a UTF-8 JSON object with a string ``file_name`` is a bad sample
    (``corrupt_member``), and so is a ``file_name`` that leaves the folder (``unsafe_path``: absolute, or
    ``..`` after normalisation). Non-UTF-8 lines are rejected, as non-UTF-8 ``.txt`` members in shards are:
    decoding them with replacement characters would train on captions that are not the user's text.
    """
    with open(directory / METADATA_FILE, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            raw = {"__key__": f"{directory.name}/{number}", "__url__": str(directory)}
            entry, problem = _metadata_entry(line)
            if entry is None:
                yield raw | {"__bad__": "corrupt_member", "__detail__": f"{METADATA_FILE} line {number}: {problem}"}
                continue
            name = entry["file_name"]
            if not _inside_folder(name):
                detail = f"{METADATA_FILE} line {number}: file_name {name!r} is outside the folder"
                yield raw | {"__bad__": "unsafe_path", "__detail__": detail}
                continue
            raw["__key__"] = str(Path(name).with_suffix(""))
            raw["__path__"] = str(directory / name)
            raw["__meta__"] = entry
            yield raw


def _metadata_entry(line: bytes) -> tuple[dict | None, str]:
    """(the JSON object of a metadata line, "") or (None, what is wrong with it)."""
    try:
        entry = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except json.JSONDecodeError as exn:
        return None, f"not JSON ({exn.msg})"
    if not isinstance(entry, dict):
        return None, f"expected a JSON object, got {type(entry).__name__}"
    if not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
        return None, f"file_name: expected a relative path string, got {entry.get('file_name')!r}"
    return entry, ""


def _inside_folder(name: str) -> bool:
    """True for a relative path that stays inside its folder (checked lexically: symlinked files are fine)."""
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive:
        return False
    return ".." not in PurePosixPath(os.path.normpath(name.replace("\\", "/"))).parts
