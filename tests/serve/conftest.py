"""Session fixtures: the tiny pipeline folder, a LoRA folder, and one shared `t2i serve` process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import TINY_MODEL, ServerProcess, build_tiny_pipeline, save_tiny_lora

API_KEY = "test-key-0123"


@pytest.fixture(scope="session")
def tiny_pipeline():
    return build_tiny_pipeline()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tiny_pipeline) -> Path:
    folder = tmp_path_factory.mktemp("serve_models") / "tiny"
    tiny_pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, tiny_pipeline) -> Path:
    """`style.safetensors` fits the tiny model; `wide.safetensors` was made for a wider UNet and does not."""
    folder = tmp_path_factory.mktemp("serve_loras")
    save_tiny_lora(tiny_pipeline, folder / "style.safetensors")
    wide = {**TINY_MODEL, "unet_config": {**TINY_MODEL["unet_config"], "model_channels": 64}}
    save_tiny_lora(build_tiny_pipeline(wide), folder / "wide.safetensors")
    return folder


@pytest.fixture(scope="session")
def server(tmp_path_factory, model_dir, lora_dir):
    """One server for the API, error, load and page tests: API key, batches of up to 4, 32 waiting requests."""
    log = tmp_path_factory.mktemp("serve_logs") / "server.log"
    proc = ServerProcess(
        ["--model", str(model_dir), "--lora-dir", str(lora_dir), "--max-batch", "4", "--max-queue", "32",
         "--max-steps", "50", "--batch-wait-ms", "20"],
        log, api_key=API_KEY,
    )
    yield proc
    proc.stop()
