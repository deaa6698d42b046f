"""Atomic, inert training checkpoints, crash-safe pruning, verification, and the RNG capture for exact resume.

Layout of `OUT_DIR/ckpt-000100/` (a directory is complete or absent: it is written as `ckpt-000100.tmp/`,
every file fsynced, the marker last, then renamed):
- `model.safetensors`  the task's `model_state_dict()` (live weights)
- `ema.safetensors`    the EMA shadow of the same keys (when EMA is enabled)
- `state.pt`           step, optimizer, grad scaler, per-rank RNG + data position, loss history; tensors,
                       numbers, strings, lists and dicts only, read back with `torch.load(weights_only=True)`
- `config.yaml`        the resolved run config
- `complete.json`      the completion marker, written last: format, step and the size of every file above

Only complete checkpoints are listed: with a marker, or (written by t2i before markers existed) with
model.safetensors, state.pt and config.yaml all present. Such legacy checkpoints are accepted when they also
pass `verify_checkpoint`'s structural checks; nothing else distinguishes them from new ones.

Deleting is crash-safe: a checkpoint is first renamed to `.trash-ckpt-...` (atomic, so it leaves the listing
at once) and then removed. `sweep_run_folder` (run at the start of training, under the run lock) removes what
a kill can leave behind: `.tmp` and `.trash-` directories, temporary files, incomplete `ckpt-*` directories.

Verification (`verify_checkpoint`, run before resuming from a checkpoint or exporting it) checks the sizes the
marker recorded, that each safetensors file holds as many bytes as its header declares, and that state.pt is a
complete zip archive. `resume=auto` takes the newest checkpoint that verifies and names the ones it skipped.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from t2i.atomic import TMP_SUFFIX, tensor_bytes, write_file, write_safetensors
from t2i.errors import CheckpointError, ConfigError
from t2i.models.weights import load_inert

log = logging.getLogger("t2i.train")

CKPT_RE = re.compile(r"^ckpt-(\d+)$")
MODEL_FILE, EMA_FILE, STATE_FILE, CONFIG_FILE = "model.safetensors", "ema.safetensors", "state.pt", "config.yaml"
MARKER_FILE = "complete.json"
REQUIRED_FILES = (MODEL_FILE, STATE_FILE, CONFIG_FILE)
TRASH_PREFIX = ".trash-"
_trash_counter = itertools.count()


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
    """Write checkpoint `ckpt-<step>` atomically into `out_dir`, then prune to the newest `keep_last`.

    A full disk raises `DiskFullError` naming the file and the bytes needed; the partial `.tmp` directory is
    removed and every older checkpoint is kept.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / checkpoint_name(step)
    tmp = out_dir / f"{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_tensors(tmp / MODEL_FILE, model_state)
        if ema_state is not None:
            _write_tensors(tmp / EMA_FILE, ema_state)
        write_file(tmp / STATE_FILE, lambda f: torch.save(train_state, f), needed=tensor_bytes(train_state))
        config = config_yaml.encode("utf-8")
        write_file(tmp / CONFIG_FILE, lambda f: f.write(config), needed=len(config))
        _write_marker(tmp, step)
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out_dir)
    if keep_last:
        prune_checkpoints(out_dir, keep_last)
    return final


def _write_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    tensors = _contiguous_cpu(state)
    write_file(path, lambda f: write_safetensors(f, tensors), needed=tensor_bytes(tensors))


def _write_marker(directory: Path, step: int) -> None:
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
    marker = json.dumps({"format": 1, "step": step, "files": files}, indent=1).encode("utf-8")
    write_file(directory / MARKER_FILE, lambda f: f.write(marker), needed=len(marker))


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
    """Rename `src` to `dst`; an existing `dst` (same step saved twice) is moved to the trash first."""
    old = _to_trash(dst) if dst.exists() else None
    os.replace(src, dst)
    if old is not None:
        remove_tree(old)


def _to_trash(path: Path) -> Path:
    """Rename `path` to a `.trash-` name beside it (atomic: it leaves the checkpoint listing at once)."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}-{next(_trash_counter)}")
    os.replace(path, trash)
    return trash


def remove_tree(path: Path) -> None:
    """Delete a directory that is already out of the listing (a trash or temporary directory)."""
    shutil.rmtree(path, ignore_errors=True)


def delete_checkpoint(path: str | Path) -> None:
    """Remove a checkpoint directory; a kill halfway leaves only a `.trash-` directory, never a half checkpoint."""
    remove_tree(_to_trash(Path(path)))


def _contiguous_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or strided storage; a CPU clone is always safe to write.
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in state.items()}


# ----------------------------------------------------------------------------------------------- listing


def _step_dirs(out_dir: Path) -> list[Path]:
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if p.is_dir() and CKPT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def is_complete(path: str | Path) -> bool:
    """A checkpoint dir with its completion marker, or a legacy one (no marker) with every required file."""
    path = Path(path)
    return (path / MARKER_FILE).is_file() or all((path / name).is_file() for name in REQUIRED_FILES)


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint dirs in `out_dir`, oldest first (`.tmp`, trash and incomplete dirs are ignored)."""
    return [p for p in _step_dirs(Path(out_dir)) if is_complete(p)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def prune_checkpoints(out_dir: str | Path, keep_last: int) -> None:
    for old in list_checkpoints(out_dir)[:-keep_last]:
        delete_checkpoint(old)


def sweep_run_folder(out_dir: str | Path) -> list[str]:
    """Remove what an interrupted run leaves behind; returns the names removed. Call only under the run lock.

    Removed: `ckpt-*.tmp` (a save in progress), `.trash-*` (a delete in progress), `ckpt-*.old` (older
    versions' replace), `.*.t2i-tmp` files (an atomic write in progress) and `ckpt-*` dirs that are not
    complete (an older version's prune that was killed halfway). Complete checkpoints are never touched.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    removed = []
    for path in sorted(out_dir.iterdir()):
        name = path.name
        leftover_dir = path.is_dir() and (
            name.startswith(TRASH_PREFIX)
            or (name.startswith("ckpt-") and name.endswith((".tmp", ".old")))
            or (CKPT_RE.match(name) is not None and not is_complete(path))
        )
        if leftover_dir:
            remove_tree(_to_trash(path) if CKPT_RE.match(name) else path)
            removed.append(name)
        elif path.is_file() and name.startswith(".") and name.endswith(TMP_SUFFIX):
            path.unlink(missing_ok=True)
            removed.append(name)
    return removed


# ----------------------------------------------------------------------------------------------- verification


def verify_checkpoint(path: str | Path) -> str | None:
    """None when the checkpoint is complete and intact, else why not (one phrase).

    Checks: the marker's recorded sizes (legacy checkpoints: the required files exist), every safetensors
    file is as long as its header says, state.pt is a whole zip archive. Cheap: no tensor data is read.
    """
    path = Path(path)
    marker = path / MARKER_FILE
    if marker.is_file():
        try:
            files = json.loads(marker.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError) as exn:
            return f"{MARKER_FILE} is unreadable ({type(exn).__name__})"
    else:
        missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
        if missing:
            return f"incomplete (no {MARKER_FILE}, missing {', '.join(missing)})"
        files = {}
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, {size} when saved (truncated or changed)"
    for name in (MODEL_FILE, EMA_FILE):
        if (path / name).is_file():
            problem = _safetensors_problem(path / name)
            if problem:
                return f"{name}: {problem}"
    if not zipfile.is_zipfile(path / STATE_FILE):
        return f"{STATE_FILE} is not a complete torch archive (truncated?)"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (its header must parse and its data end at the file's end)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                return f"header length {length} exceeds the file ({size} bytes)"
            header = json.loads(handle.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError) as exn:
        return f"not a safetensors file ({type(exn).__name__})"
    if 8 + length + end != size:
        return f"{size} bytes, its header needs {8 + length + end} (truncated)"
    return None


def newest_verified_checkpoint(out_dir: str | Path, report: bool = True) -> Path | None:
    """The newest checkpoint in `out_dir` that verifies; each newer one skipped is logged with its reason."""
    for path in reversed(list_checkpoints(out_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        if report:
            log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def find_resume_checkpoint(resume: str | None, out_dir: str | Path, report: bool = True) -> Path | None:
    """`trainer.resume`: None -> no resume; `auto` -> newest in out_dir that verifies (None if there is none);
    a checkpoint dir -> that one (CheckpointError if it does not verify); a run dir -> its newest that verifies."""
    if resume is None:
        return None
    if resume == "auto":
        return newest_verified_checkpoint(out_dir, report)
    path = Path(resume)
    if (path / STATE_FILE).is_file() or (path / MARKER_FILE).is_file():
        problem = verify_checkpoint(path)
        if problem:
            raise CheckpointError(f"trainer.resume: {path}: {problem}")
        return path
    newest = newest_verified_checkpoint(path, report) if path.is_dir() else None
    if newest is None:
        raise ConfigError(f"trainer.resume: {resume!r} is neither a checkpoint dir (with {STATE_FILE}) "
                          "nor a run dir containing a complete ckpt-* checkpoint")
    return newest


# ----------------------------------------------------------------------------------------------- loading


def load_train_state(ckpt: str | Path) -> dict[str, Any]:
    """The `state.pt` dict of a checkpoint (weights_only: no code is unpickled; refusals say why)."""
    path = Path(ckpt) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: not a t2i checkpoint (no {STATE_FILE})")
    return load_inert(path)


def load_weights(ckpt: str | Path, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """EMA weights of a checkpoint when `use_ema` and present, else the live model weights."""
    ckpt = Path(ckpt)
    path = ckpt / EMA_FILE if use_ema and (ckpt / EMA_FILE).is_file() else ckpt / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: not a t2i checkpoint (no {MODEL_FILE})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exn:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(exn).splitlines()[0][:160]})") from None


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
