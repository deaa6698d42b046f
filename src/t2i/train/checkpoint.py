"""Atomic, inert training checkpoints and the RNG capture that makes resuming exact.

Layout of `OUT_DIR/ckpt-000100/` (a directory is complete or absent: it is written as `ckpt-000100.tmp/`,
every file fsynced, then renamed):
- `model.safetensors`  the task's `model_state_dict()` (live weights)
- `ema.safetensors`    the EMA shadow of the same keys (when EMA is enabled)
- `state.pt`           step, optimizer, grad scaler, per-rank RNG + data position, loss history; tensors,
                       numbers, strings, lists and dicts only, read back with `torch.load(weights_only=True)`
- `config.yaml`        the resolved run config
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from t2i.errors import ConfigError, PipelineLoadError

CKPT_RE = re.compile(r"^ckpt-(\d+)$")
MODEL_FILE, EMA_FILE, STATE_FILE, CONFIG_FILE = "model.safetensors", "ema.safetensors", "state.pt", "config.yaml"


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:06d}"


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor] | None,
    train_state: dict[str, Any],
    config_yaml: str,
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint `ckpt-<step>` atomically into `out_dir`, then prune to the newest `keep_last`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / checkpoint_name(step)
    tmp = out_dir / f"{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_synced(tmp / MODEL_FILE, lambda p: save_file(_contiguous_cpu(model_state), str(p)))
        if ema_state is not None:
            _write_synced(tmp / EMA_FILE, lambda p: save_file(_contiguous_cpu(ema_state), str(p)))
        _write_synced(tmp / STATE_FILE, lambda p: torch.save(train_state, p))
        _write_synced(tmp / CONFIG_FILE, lambda p: p.write_text(config_yaml))
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out_dir)
    if keep_last:
        prune_checkpoints(out_dir, keep_last)
    return final


def _write_synced(path: Path, write: Any) -> None:
    write(path)
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; an existing `dst` (same step saved twice) is moved aside first."""
    if dst.exists():
        old = dst.with_name(dst.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def _contiguous_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or strided storage; a CPU clone is always safe to write.
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in state.items()}


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint dirs in `out_dir`, oldest first (unfinished `.tmp` dirs are ignored)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if p.is_dir() and CKPT_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def prune_checkpoints(out_dir: str | Path, keep_last: int) -> None:
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def find_resume_checkpoint(resume: str | None, out_dir: str | Path) -> Path | None:
    """`trainer.resume`: None -> no resume; `auto` -> newest in out_dir (None if there is none);
    a checkpoint dir -> that one; a run dir -> its newest checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(out_dir)
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    newest = latest_checkpoint(path)
    if newest is None:
        raise ConfigError(f"trainer.resume: {resume!r} is neither a checkpoint dir (with {STATE_FILE}) "
                          "nor a run dir containing ckpt-* checkpoints")
    return newest


def load_train_state(ckpt: str | Path) -> dict[str, Any]:
    """The `state.pt` dict of a checkpoint (weights_only: no code is unpickled)."""
    path = Path(ckpt) / STATE_FILE
    if not path.is_file():
        raise PipelineLoadError(f"{ckpt}: not a t2i checkpoint (no {STATE_FILE})")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_weights(ckpt: str | Path, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """EMA weights of a checkpoint when `use_ema` and present, else the live model weights."""
    ckpt = Path(ckpt)
    path = ckpt / EMA_FILE if use_ema and (ckpt / EMA_FILE).is_file() else ckpt / MODEL_FILE
    if not path.is_file():
        raise PipelineLoadError(f"{ckpt}: not a t2i checkpoint (no {MODEL_FILE})")
    return load_file(str(path))


def load_task_weights(task: Any, ckpt: str | Path, use_ema: bool = True) -> None:
    """Load a checkpoint's (EMA) weights into a `DiffusionTask`, e.g. before `task.export(...)`."""
    task.load_model_state_dict(load_weights(ckpt, use_ema))


# ----------------------------------------------------------------------------------------------- RNG state


def capture_rng(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG the loop touches (torch CPU/CUDA, numpy, python, the task's generator) as plain tensors."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
