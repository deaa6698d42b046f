"""Tiny random diffusers SD folder (built by tests/pipelines/sd_helpers.py) shared by the LoRA and recipe tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))


@pytest.fixture(scope="session")
def sd1_lora_dir(tmp_path_factory) -> Path:
    from sd_helpers import tiny_diffusers_pipeline

    folder = tmp_path_factory.mktemp("sd1_lora_base")
    tiny_diffusers_pipeline("sd1").save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run faster on one thread when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
