"""`t2i sample --lora PATH[:SCALE]` (repeatable) gives the images of the Python API with the same LoRAs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lora_helpers import lora_train_yaml as write_train_yaml
from PIL import Image
from safetensors.torch import save_file

import t2i
from t2i.cli.main import main
from t2i.lora import apply_lora, load_lora, save_lora_file
from t2i.lora.inference import parse_lora_spec
from t2i.lora.peft_lora import lora_layers


def write_lora(base_dir: Path, path: Path, seed: int) -> Path:
    pipe = t2i.load_pipeline(base_dir)
    torch.manual_seed(seed)
    apply_lora(pipe.unet, rank=2, alpha=2.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(pipe.unet):
            layer.lora_B["default"].weight.normal_(0, 0.3, generator=gen)
    return save_lora_file(pipe, path)


def test_parse_lora_spec_reads_an_optional_trailing_scale():
    assert parse_lora_spec("a/b.safetensors:0.7") == (Path("a/b.safetensors"), 0.7)
    assert parse_lora_spec("a/b.safetensors") == (Path("a/b.safetensors"), 1.0)
    assert parse_lora_spec("c:/x/b.safetensors") == (Path("c:/x/b.safetensors"), 1.0)
    assert parse_lora_spec("b.safetensors:-1") == (Path("b.safetensors"), -1.0)


def test_sample_with_two_loras_matches_the_python_api(sd1_lora_dir, tmp_path):
    first = write_lora(sd1_lora_dir, tmp_path / "first.safetensors", seed=1)
    second = write_lora(sd1_lora_dir, tmp_path / "second.safetensors", seed=2)
    out = tmp_path / "cli.png"
    argv = [
        "sample",
        "--model",
        str(sd1_lora_dir),
        "--prompt",
        "a red circle",
        "--out",
        str(out),
        "--steps",
        "2",
        "--seed",
        "0",
        "--device",
        "cpu",
        "--guidance",
        "3",
        "--lora",
        f"{first}:0.5",
        "--lora",
        str(second),
    ]
    assert main(argv) == 0

    pipe = t2i.load_pipeline(sd1_lora_dir)
    load_lora(pipe, first, scale=0.5)
    load_lora(pipe, second)
    expected = pipe.generate("a red circle", steps=2, seed=0, guidance_scale=3.0, progress=False).images[0]
    base = (
        t2i.load_pipeline(sd1_lora_dir)
        .generate("a red circle", steps=2, seed=0, guidance_scale=3.0, progress=False)
        .images[0]
    )
    ours = np.asarray(Image.open(out), dtype=np.int16)
    assert np.abs(ours - np.asarray(expected, dtype=np.int16)).max() <= 1
    assert np.abs(ours - np.asarray(base, dtype=np.int16)).max() > 10


def test_sample_with_a_bad_lora_file_fails_with_a_one_line_error(sd1_lora_dir, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    save_file({"unet.not_a_module.lora_A.weight": torch.zeros(2, 4),
               "unet.not_a_module.lora_B.weight": torch.zeros(4, 2)}, str(bad))  # fmt: skip
    argv = [
        "sample",
        "--model",
        str(sd1_lora_dir),
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "o.png"),
        "--steps",
        "1",
        "--device",
        "cpu",
        "--lora",
        str(bad),
    ]
    assert main(argv) == 2
    assert "unet.not_a_module" in capsys.readouterr().err


def lora_train_yaml(tmp_path: Path, base: Path, prior_loss: str) -> Path:
    prior = f'prior: {{class_prompts: ["a red circle"], num_images: 2, loss: {prior_loss}, steps: 2, guidance_scale: 1.0}}'
    return write_train_yaml(tmp_path, base, f"rank: 2, alpha: 2.0, target_modules: [attention, conv], {prior}")


def test_lora_train_takes_prior_preservation_from_the_config_and_the_flags(sd1_lora_dir, tmp_path, monkeypatch):
    from t2i.train.tasks.adapters import PriorPreservationTask

    used = []
    prior_loss = PriorPreservationTask.prior_loss

    def spy(self, batch_size, generator):
        used.append((self.prior.loss, self.prior.loss_weight, len(self.class_x0)))
        return prior_loss(self, batch_size, generator)

    monkeypatch.setattr(PriorPreservationTask, "prior_loss", spy)
    config = lora_train_yaml(tmp_path, sd1_lora_dir, "distill")
    assert main(["lora", "train", "--config", str(config), "--out", str(tmp_path / "a")]) == 0
    assert used == [("distill", 1.0, 2)] * 2
    assert (tmp_path / "a" / "lora.safetensors").is_file()

    used.clear()
    argv = ["lora", "train", "--config", str(config), "--out", str(tmp_path / "b"), "--class-prompt", "a blue cross",
            "--class-images", "3", "--prior-loss-weight", "0.5", "--prior-loss", "diffusion"]  # fmt: skip
    assert main(argv) == 0
    assert used == [("diffusion", 0.5, 3)] * 2


def test_lora_train_with_an_unknown_prior_loss_names_the_key(sd1_lora_dir, tmp_path, capsys):
    config = lora_train_yaml(tmp_path, sd1_lora_dir, "l2")
    assert main(["lora", "train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.lora.prior.loss: 'l2' is not one of diffusion, distill" in err and "\n" not in err
