"""CLI mistakes end in one stderr line `t2i CMD: error: ...` and exit 2, checked before any work is done."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import autoencoder_config, one_line_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    from sd_helpers import tiny_diffusers_pipeline

    folder = tmp_path_factory.mktemp("rel_sd1")
    tiny_diffusers_pipeline("sd1").save_pretrained(folder)
    return folder


@pytest.fixture
def sampling_spy(monkeypatch) -> list:
    """Records each call of the sampling step of `t2i sample` (bad arguments must stop before it)."""
    from t2i.cli import sample

    calls: list = []
    real = sample.generate_from_args

    def spy(pipe, args):
        calls.append(args.out)
        return real(pipe, args)

    monkeypatch.setattr(sample, "generate_from_args", spy)
    return calls


def _sample(pipeline_dir: Path, out: str, *extra: str) -> list[str]:
    return ["sample", "--model", str(pipeline_dir), "--prompt", "a red circle", "--out", out, "--steps", "1",
            "--device", "cpu", *extra]


@pytest.mark.traceback
@pytest.mark.parametrize("name", ["noext", "out.xyz", "DIRECTORY"])
def test_sample_out_that_is_not_an_image_file_is_refused_before_sampling(tmp_path, capsys, pipeline_dir,
                                                                          sampling_spy, name):
    out = str(tmp_path) if name == "DIRECTORY" else str(tmp_path / name)
    expected = "is a directory" if name == "DIRECTORY" else "expected an image file name ending in"
    one_line_error(capsys, _sample(pipeline_dir, out), f"--out {out}", expected)
    assert sampling_spy == []


@pytest.mark.traceback
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_sample_device_cuda_without_cuda(tmp_path, capsys, pipeline_dir, sampling_spy):
    argv = _sample(pipeline_dir, str(tmp_path / "o.png"))[:-2] + ["--device", "cuda"]
    one_line_error(capsys, argv, "--device cuda: CUDA is not available", "--device cpu")
    assert sampling_spy == []


@pytest.mark.traceback
@pytest.mark.parametrize("device", ["gpu0", "tpu", "meta"])
def test_sample_unknown_device(tmp_path, capsys, pipeline_dir, sampling_spy, device):
    argv = _sample(pipeline_dir, str(tmp_path / "o.png"))[:-2] + ["--device", device]
    one_line_error(capsys, argv, f"--device {device}:")
    assert sampling_spy == []


@pytest.mark.silent
def test_sample_lora_scale_that_is_not_a_number(tmp_path, capsys, pipeline_dir, sampling_spy):
    from safetensors.torch import save_file

    lora = tmp_path / "style.safetensors"
    save_file({"x": torch.zeros(1)}, str(lora))
    one_line_error(capsys, _sample(pipeline_dir, str(tmp_path / "o.png"), "--lora", f"{lora}:abc"),
                   "scale 'abc' is not a number")
    assert sampling_spy == []


@pytest.mark.traceback
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_sample_on_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, pipeline_dir, monkeypatch):
    from t2i import atomic

    monkeypatch.setattr(atomic, "open_for_writing", lambda path: open("/dev/full", "wb"))  # noqa: SIM115
    out = tmp_path / "o.png"
    one_line_error(capsys, _sample(pipeline_dir, str(out), "--height", "32", "--width", "32"),
                   f"no space left on device writing {out} (needs ", after_progress=True)
    assert list(tmp_path.iterdir()) == []


def test_sample_writes_the_image_atomically(tmp_path, capsys, pipeline_dir):
    from t2i.cli.main import main

    out = tmp_path / "sub" / "o.webp"
    assert main(_sample(pipeline_dir, str(out), "--height", "32", "--width", "32")) == 0
    from PIL import Image

    assert Image.open(out).format == "WEBP" and [p.name for p in out.parent.iterdir()] == ["o.webp"]


# ------------------------------------------------------------------------------------------- t2i info


@pytest.mark.traceback
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_info_on_a_corrupt_safetensors_file(tmp_path, capsys, damage):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    if damage == "garbage":
        path.write_bytes(b"\x00\x01 this is no safetensors header" * 10)
    else:
        save_file({"model.diffusion_model.x": torch.zeros(64, 64)}, str(path))
        path.write_bytes(path.read_bytes()[:200])
    one_line_error(capsys, ["info", str(path)], str(path), "not a readable safetensors file")


@pytest.mark.silent
def test_info_on_a_file_that_is_neither_config_nor_checkpoint(tmp_path, capsys):
    path = tmp_path / "notlora.txt"
    path.write_text("just some notes\n")
    one_line_error(capsys, ["info", str(path)], "not a config or checkpoint file", ".yaml", ".safetensors")


def test_info_on_a_corrupt_bin_file(tmp_path, capsys):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"garbage" * 20)
    one_line_error(capsys, ["info", str(path)], str(path))


# ------------------------------------------------------------------------------------------- t2i export


@pytest.fixture
def trained_run(tmp_path, single_thread) -> Path:
    from t2i.cli.main import main
    from t2i.data.shapes import write_shapes_dataset

    write_shapes_dataset(tmp_path / "shapes", 4, 16, seed=0, shard_size=4)
    config = autoencoder_config(tmp_path, str(tmp_path / "shapes"))
    assert main(["train", str(config), "trainer.max_steps=1", "trainer.checkpoint_every=1"]) == 0
    return tmp_path / "run"


@pytest.mark.traceback
@pytest.mark.parametrize("marker", [True, False])
def test_export_of_a_corrupt_checkpoint(capsys, trained_run, marker):
    ckpt = trained_run / "ckpt-000001"
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" * 3)
    if not marker:
        (ckpt / "complete.json").unlink(missing_ok=True)  # as older t2i versions wrote it
    out = str(trained_run.parent / "export")
    one_line_error(capsys, ["export", str(ckpt), "--out", out], str(ckpt), "model.safetensors")
    one_line_error(capsys, ["export", str(trained_run), "--out", out], "none of its checkpoints verifies")


# ------------------------------------------------------------------------------------------- t2i train


@pytest.mark.silent
@pytest.mark.parametrize(("override", "key"), [("model.linear_start=0.02", "model.linear_end"),
                                               ("model.cond_stage_config.max_length=0",
                                                "model.cond_stage_config.max_length")])
def test_train_config_values_that_were_silently_accepted(capsys, override, key):
    one_line_error(capsys, ["train", "sd15", override, "--print-config"], f"{key}: expected")


# ------------------------------------------------------------------------------------------- OS errors


@pytest.mark.traceback
@pytest.mark.parametrize("case", ["not_permitted", "not_a_directory", "no_such_directory"])
def test_os_errors_on_user_paths_are_one_line(tmp_path, capsys, case):
    (tmp_path / "file").write_text("x")
    out = {"not_permitted": "/sys/t2i-test-out", "not_a_directory": str(tmp_path / "file" / "sub"),
           "no_such_directory": "/proc/t2i-test-out"}[case]
    if case == "not_permitted" and not Path("/sys").is_dir():
        pytest.skip("needs /sys")
    one_line_error(capsys, ["data", "shapes", "--out", out, "--num", "2", "--size", "16"], out)
