"""Reading weight files and checking a state dict against the keys a model expects, with the one-line errors
every loader raises.

`read_diffusers_weights` reads a diffusers model folder the way the hub stores them: one safetensors file, a
sharded set with its index JSON, the same as pickled `.bin` files (read with `torch.load(weights_only=True)`, so a
file that holds code is refused), each optionally as a `variant` (`diffusion_pytorch_model.fp16.safetensors`).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from t2i.errors import CheckpointError, PipelineLoadError, WeightsMismatchError

WEIGHTS_STEM = "diffusion_pytorch_model"


def check_state_keys(state: Mapping[str, Any], expected: Iterable[str], what: str, source: str) -> None:
    """WeightsMismatchError naming the first missing and unexpected keys unless `state` has exactly `expected`."""
    expected = list(expected)
    wanted = set(expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in wanted]
    if missing or unexpected:
        raise WeightsMismatchError(
            f"{source}: {what} weights do not match the config; missing {missing[:3]} ({len(missing)} total), "
            f"unexpected {unexpected[:3]} ({len(unexpected)} total)"
        )


def load_inert(path: str | Path) -> Any:
    """`torch.load(path, weights_only=True)` with one-line CheckpointErrors for corrupt or pickled-code files."""
    import pickle

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exn:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: not a torch archive (truncated or not a torch.save file)") from None
        raise CheckpointError(f"{path}: refused to load: it holds pickled objects or code, not only tensors "
                              f"({unpickling_reason(exn)})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exn:
        first = str(exn).strip().splitlines()[0] if str(exn).strip() else type(exn).__name__
        raise CheckpointError(f"{path}: unreadable torch file ({first[:160]})") from None


def unpickling_reason(exn: Exception) -> str:
    """The informative line of torch's weights_only refusal (e.g. "unsupported GLOBAL posix.system ...")."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(exn).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)]
    return (useful[0] if useful else lines[0] if lines else type(exn).__name__)[:200]


def with_variant(name: str, variant: str | None) -> str:
    """diffusers' file naming: `a.safetensors` -> `a.fp16.safetensors`, `a.safetensors.index.json` ->
    `a.safetensors.index.fp16.json`."""
    if not variant:
        return name
    head, _, suffix = name.rpartition(".")
    return f"{head}.{variant}.{suffix}"


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` file (on the CPU) or of a `.bin` torch file (weights only)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as exn:
            raise PipelineLoadError(f"{path}: unreadable safetensors file ({exn})") from None
    state = load_inert(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineLoadError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return state


def diffusers_weight_files(folder: Path, variant: str | None = None, stem: str = WEIGHTS_STEM) -> list[Path]:
    """The files holding a diffusers model's weights, safetensors before `.bin`, single before sharded. A folder
    without the `variant` asked for gives its plain weights (as diffusers does for such components)."""
    if variant and not has_variant(folder, variant) and has_variant(folder, None, stem):
        variant = None
    for suffix in ("safetensors", "bin"):
        single = folder / with_variant(f"{stem}.{suffix}", variant)
        if single.is_file():
            return [single]
        index = folder / with_variant(f"{stem}.{suffix}.index.json", variant)
        if index.is_file():
            return shards_of(index)
    raise PipelineLoadError(f"{folder}: {missing_weights_reason(folder, variant, stem)}")


def has_variant(folder: Path, variant: str | None, stem: str = "*") -> bool:
    """Whether `folder` holds weight files of `variant` (None: plain ones), single, sharded or indexed."""
    if variant is None:
        return any(folder.glob(f"{stem}.safetensors*")) or any(folder.glob(f"{stem}.bin*")) or any(
            folder.glob(f"{stem}-*-of-*"))
    return any(folder.glob(f"*.{variant}.*")) or any(folder.glob(f"*.{variant}-*-of-*")) or any(
        folder.glob(f"*.index.{variant}.json"))


def shards_of(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise PipelineLoadError(f"{index}: unreadable shard index; expected JSON with a weight_map") from None
    for name in names:
        if not (index.parent / name).is_file():
            raise PipelineLoadError(f"{index.parent / name}: shard named by {index.name} not found")
    return [index.parent / name for name in names]


def missing_weights_reason(folder: Path, variant: str | None, stem: str) -> str:
    """Why no weights were found: which names were looked for, and which variants the folder has instead."""
    wanted = f"{with_variant(stem + '.safetensors', variant)} or .bin (single or sharded)"
    tags = {p.name.split(".")[1].split("-")[0] for p in folder.glob(f"{stem}.*.*")} if folder.is_dir() else set()
    variants = sorted(tags - {"safetensors", "bin"})
    if variants and variant not in variants:
        return f"no {wanted}; the folder has variant {', '.join(variants)}: load it with variant={variants[0]!r}"
    if variant:
        return f"no {wanted}; the folder has no {variant!r} variant (load it without variant=)"
    return f"no {wanted}; expected a diffusers model folder"


def read_diffusers_weights(folder: Path, variant: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers model folder (see the module docstring for the layouts read)."""
    weights: dict[str, torch.Tensor] = {}
    for path in diffusers_weight_files(folder, variant):
        weights.update(read_tensor_file(path))
    return weights
