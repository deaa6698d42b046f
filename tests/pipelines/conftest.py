"""Session fixtures: tiny random diffusers SD folders (see sd_helpers.py), saved once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
from sd_helpers import tiny_diffusers_pipeline


@pytest.fixture(scope="session")
def sd1_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sd1_diffusers")
    tiny_diffusers_pipeline("sd1").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sd2_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sd2_diffusers")
    tiny_diffusers_pipeline("sd2").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def quiet_loaders():
    """No progress bars from diffusers' and transformers' loaders."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
