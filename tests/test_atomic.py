"""`t2i.atomic`: the streaming safetensors writer against the safetensors library, all-or-nothing writes, and
full disks (the kernel's real ENOSPC from /dev/full) reported with the path and the bytes needed."""

from __future__ import annotations

import io
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load, save

from t2i import atomic
from t2i.errors import DiskFullError, InvalidInputError


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def test_write_safetensors_loads_with_the_library_for_every_dtype():
    tensors = {
        "f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "i64_scalar": torch.tensor(3),
        "empty": torch.zeros(0, 3), "bool": torch.rand(7) > 0.5, "f16": torch.randn(2, 2).half(),
        "f64_scalar": torch.tensor(2.5, dtype=torch.float64), "u8": torch.arange(9, dtype=torch.uint8),
        "f8": torch.randn(3).to(torch.float8_e4m3fn),
    }  # fmt: skip
    buffer = io.BytesIO()
    written = atomic.write_safetensors(buffer, tensors, {"format": "pt"})
    data = buffer.getvalue()
    assert written == len(data)
    loaded = load(data)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(_bytes(loaded[name]), _bytes(tensor)), name
    header, _, total = atomic.safetensors_layout(tensors, {"format": "pt"})
    assert total == len(data) and len(header) % 8 == 0
    assert load(save(tensors)).keys() == loaded.keys()  # the library's own file holds the same tensors


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def explode(handle):
        handle.write(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic.atomic_write(path, explode)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
    atomic.atomic_write(path, lambda handle: handle.write(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_is_one_line_with_path_and_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "open_for_writing", lambda path: open("/dev/full", "wb"))  # noqa: SIM115
    path = tmp_path / "grid.png"
    path.write_bytes(b"previous")
    with pytest.raises(DiskFullError) as caught:
        atomic.save_image(Image.new("RGB", (64, 64), "red"), path)
    message = str(caught.value)
    assert message.startswith(f"no space left on device writing {path} (needs ") and "free there" in message
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["grid.png"]
    with pytest.raises(DiskFullError, match="needs 4.0 KiB"):
        atomic.write_file(tmp_path / "x", lambda handle: handle.write(b"x" * 65536), needed=4096)


def test_image_format_from_suffix():
    assert atomic.image_format("a/b.PNG") == "PNG" and atomic.image_format("x.jpg") == "JPEG"
    for bad in ("noext", "x.xyz"):
        with pytest.raises(InvalidInputError, match="expected an image file name ending in .*\\.png"):
            atomic.image_format(bad)


def test_tensor_bytes_counts_nested_tensors():
    state = {"a": torch.zeros(10), "b": [torch.zeros(2, dtype=torch.float64), {"c": torch.zeros(3, dtype=torch.bool)}],
             "n": 5}
    assert atomic.tensor_bytes(state) == 40 + 16 + 3
