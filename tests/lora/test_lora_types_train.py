"""`t2i lora train` with `model.lora.type: loha | lokr` and `model.lora.dora` (`--type`, `--dora`): peft trains
the adapters, the export is in LyCORIS' kohya naming (LoHa, LoKr) or diffusers' (DoRA), and loading the file into
a fresh pipeline gives the trained model's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_helpers import lora_train_yaml
from safetensors import safe_open
from safetensors.torch import load_file

import t2i
from t2i.cli.main import main
from t2i.lora import load_lora
from t2i.lora.peft_lora import ADAPTER_PARAMETER_PARTS


def train_yaml(tmp_path: Path, base: Path) -> Path:
    return lora_train_yaml(tmp_path, base, "rank: 2, alpha: 4.0, target_modules: [attention, conv]", lr=2e-2, steps=3)


def unet_output(unet: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 16, 32, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 600]), ctx)


KINDS = {
    "loha": (["model.lora.type=loha"], ".hada_w2_b"),
    "lokr": (["model.lora.type=lokr"], ".lokr_w2_b"),
    "dora": (["model.lora.dora=true", "model.lora.train_text_encoder=true"], ".lora_magnitude_vector"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_trained_adapter_file_loads_back_to_the_trained_outputs(sd1_lora_dir, tmp_path, kind):
    from t2i.config import load_config
    from t2i.train.task import build_task
    from t2i.train.trainer import train

    overrides, marker = KINDS[kind]
    cfg = load_config(str(train_yaml(tmp_path, sd1_lora_dir)), overrides)
    task = build_task(cfg)
    trainable = [n for n, p in task.named_parameters() if p.requires_grad]
    assert trainable and all(any(f".{part}." in n for part in ADAPTER_PARAMETER_PARTS) for n in trainable)
    assert any(marker.strip(".") in n for n in trainable)
    train(cfg, task)
    task.eval()
    path = task.export(tmp_path / "out")
    keys = load_file(str(path))
    assert any(k.endswith(marker) for k in keys)
    if kind == "dora":  # diffusers' naming, with the header diffusers reads
        assert all(k.startswith(("unet.", "text_encoder.")) for k in keys)
        with safe_open(str(path), "pt") as handle:
            header = json.loads(handle.metadata()["lora_adapter_metadata"])
        assert header["unet.use_dora"] and header["text_encoder.use_dora"]
    else:  # LyCORIS' kohya naming, alpha per module
        assert all(k.startswith("lora_unet_") for k in keys)
        assert any(k.endswith(".alpha") for k in keys)

    trained = unet_output(task.family.backbone)
    fresh = t2i.load_pipeline(sd1_lora_dir)
    base = unet_output(fresh.unet)
    load_lora(fresh, path)
    assert (trained - base).abs().max() > 1e-3, "training should have moved the adapter"
    torch.testing.assert_close(unet_output(fresh.unet), trained, rtol=1e-5, atol=1e-6)


def test_type_and_dora_flags_reach_the_config(sd1_lora_dir, tmp_path, capsys):
    config = train_yaml(tmp_path, sd1_lora_dir)
    out = tmp_path / "k"
    assert main(["lora", "train", "--config", str(config), "--out", str(out), "--type", "lokr",
                 "--set", "trainer.max_steps=1", "--set", "trainer.checkpoint_every=1"]) == 0  # fmt: skip
    assert any(".lokr_w1" in k for k in load_file(str(out / "lora.safetensors")))
    assert main(["lora", "train", "--config", str(config), "--type", "loha", "--dora"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model.lora.dora: expected false with type loha" in err
