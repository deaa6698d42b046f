"""Files written whole or not at all, and full disks reported as one line naming the path and the bytes needed.

    atomic_write(path, lambda f: f.write(data), needed=len(data))   # temp file beside `path`, fsync, rename
    save_image(image, "out.png")                                     # PNG/JPEG/WebP... encoded first, then atomic
    write_safetensors(handle, tensors)                               # streams tensors into an open file

Every file is created by `open_for_writing`, so a full disk surfaces as the kernel's ENOSPC from a plain
``write(2)`` (tests point that function at /dev/full to exercise the real error path) and becomes a
`DiskFullError`; whatever stood at the final path before is left untouched.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from t2i.errors import DiskFullError, InvalidInputError

NO_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
TMP_SUFFIX = ".t2i-tmp"  # `.NAME.PID.t2i-tmp` beside the final file; swept from run folders at start


def open_for_writing(path: Path) -> IO[bytes]:
    """Create (or truncate) `path` for writing: the one place this module opens a file."""
    return open(path, "wb")


def write_file(path: str | Path, write: Callable[[IO[bytes]], Any], needed: int | None = None,
               name: str | Path | None = None) -> None:
    """Create `path`, fill it with ``write(handle)``, flush and fsync it.

    ENOSPC/EDQUOT raise `DiskFullError` naming `name` (default `path`) and `needed` bytes, when known.
    """
    path = Path(path)
    try:
        with open_for_writing(path) as handle:
            write(handle)
            handle.flush()
            _fsync(handle)
    except OSError as exn:
        if exn.errno in NO_SPACE_ERRNOS:
            raise disk_full(Path(name or path), needed) from None
        raise


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], needed: int | None = None) -> Path:
    """`write_file` into a temporary file beside `path`, then rename it over `path` (all or nothing)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        write_file(tmp, write, needed, name=path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def disk_full(path: Path, needed: int | None) -> DiskFullError:
    """The one-line error for a write to `path` that ran out of space."""
    free = free_bytes(path)
    need = f"needs {format_bytes(needed)}" if needed is not None else "needs more"
    have = f", {format_bytes(free)} free there" if free is not None else ""
    return DiskFullError(f"no space left on device writing {path} ({need}{have})")


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem holding `path` (its nearest existing parent), or None if unknown."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} bytes"


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside nested dicts/lists/tuples (what torch.save stores, give or take a header)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _fsync(handle: IO[bytes]) -> None:
    try:
        os.fsync(handle.fileno())
    except OSError as exn:
        if exn.errno not in (errno.EINVAL, errno.ENOTSUP):  # devices and some filesystems do not sync
            raise


# ----------------------------------------------------------------------------------------------- images


def image_format(path: str | Path, what: str = "") -> str:
    """PIL's format name for the suffix of `path` (`.png` -> PNG); InvalidInputError when PIL cannot write it.

    `what` prefixes the message (e.g. "--out ").
    """
    from PIL import Image

    suffix = Path(path).suffix.lower()
    formats = Image.registered_extensions()
    if suffix in formats and formats[suffix] in Image.SAVE:
        return formats[suffix]
    writable = sorted(ext for ext, fmt in formats.items() if fmt in Image.SAVE and ext in _COMMON_SUFFIXES)
    got = f"suffix {suffix!r}" if suffix else "no suffix"
    raise InvalidInputError(f"{what}{path}: {got}; expected an image file name ending in {', '.join(writable)}")


_COMMON_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def save_image(image: Any, path: str | Path) -> Path:
    """Save a PIL image atomically in the format its suffix names (encoded in memory first)."""
    fmt = image_format(path)
    buffer = io.BytesIO()
    if fmt == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")
    image.save(buffer, format=fmt)
    data = buffer.getvalue()
    return atomic_write(path, lambda handle: handle.write(data), needed=len(data))


# ----------------------------------------------------------------------------------------------- safetensors

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
    **({torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"} if hasattr(torch, "float8_e4m3fn") else {}),
}  # fmt: skip


def safetensors_layout(tensors: dict[str, torch.Tensor],
                       metadata: dict[str, str] | None = None) -> tuple[bytes, list[str], int]:
    """(8-byte length + padded JSON header, tensor names in file order, total file size).

    Tensors are stored largest element size first (then by name), as the safetensors library does, so each
    one starts aligned to its element size.
    """
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise InvalidInputError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(len(text) + 8) % 8)
    return len(text).to_bytes(8, "little") + text, order, 8 + len(text) + offset


def write_safetensors(handle: IO[bytes], tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> int:
    """Write `tensors` (CPU) as a safetensors file into the open binary `handle`; returns the bytes written.

    Streams one tensor at a time (no copy of the whole file in memory); the result loads with
    `safetensors.torch.load_file`.
    """
    if sys.byteorder != "little":  # the format is little-endian; let the library convert
        from safetensors.torch import save

        data = save(tensors, metadata)
        handle.write(data)
        return len(data)
    header, order, total = safetensors_layout(tensors, metadata)
    handle.write(header)
    for name in order:
        tensor = tensors[name].detach().contiguous()
        if tensor.numel():
            handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return total


def output_folder(path: str | Path, what: str = "folder") -> Path:
    """`path` as an existing or new folder to write into; InvalidInputError when it is a file (or not a path)."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise InvalidInputError(f"{what}: {path!r}; expected the path of a folder to write")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"{path}: is a file; expected a folder to write the {what} into")
    path.mkdir(parents=True, exist_ok=True)
    return path
