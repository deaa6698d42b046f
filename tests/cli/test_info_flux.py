"""`t2i info` on the Flux configs: the FLUX.1 transformers' parameter counts, built on the meta device."""

from __future__ import annotations

import subprocess
import sys

import pytest

from t2i.cli.info import describe


@pytest.mark.parametrize(
    ("name", "transformer"), [("flux/flux-dev", 11_901_408_320), ("flux/flux-schnell", 11_891_178_560)]
)
def test_info_counts_flux1_on_meta(name, transformer):
    counts = describe(name)
    assert counts["transformer"] == ("FluxTransformer", transformer)
    assert counts["vae"] == ("AutoencoderKL", 83_819_683)  # FLUX.1's ae
    assert counts["context_encoder"] == ("T5EncoderModel", 4_762_310_656)  # T5 v1.1 XXL encoder
    assert counts["pooled_encoder"] == ("CLIPTextModel", 123_060_480)  # CLIP ViT-L/14 text


def test_info_prints_the_counts():
    out = subprocess.run(
        [sys.executable, "-m", "t2i.cli.main", "info", "flux/flux-dev"], capture_output=True, text=True, check=True
    ).stdout
    assert "transformer: FluxTransformer 11,901,408,320" in out
