"""The benchmark scripts run end to end at a tiny `--smoke` setting and print their ratio line (no timing is
asserted), and the analytic UNet FLOP counter used for MFU matches torch's FlopCounterMode (the reference)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
RATIO = re.compile(r"^ratio line: .* = (\d+\.\d+)$", re.MULTILINE)


@pytest.fixture(scope="module", autouse=True)
def _benchmarks_on_path():
    sys.path.insert(0, str(BENCHMARKS))
    threads = torch.get_num_threads()
    yield
    sys.path.remove(str(BENCHMARKS))
    torch.set_num_threads(threads)


def ratio_of(output: str) -> float:
    match = RATIO.search(output)
    assert match, f"no ratio line in:\n{output}"
    return float(match.group(1))


def test_train_throughput_smoke_prints_every_method_and_a_ratio(capsys):
    import train_throughput

    train_throughput.main(["--smoke"])
    out = capsys.readouterr().out
    for method in ("diffusers online", "t2i online", "diffusers precached", "t2i precached"):
        assert re.search(rf"^{method}\s+\d+\.\d", out, re.MULTILINE), out
    assert ratio_of(out) > 0


def test_pipeline_smoke_matches_diffusers_images_and_prints_a_ratio(capsys):
    import pipeline_vs_diffusers

    pipeline_vs_diffusers.main(["--smoke"])
    out = capsys.readouterr().out
    assert ratio_of(out) > 0
    diff = float(re.search(r"max \|image diff\| (\d+\.\d+)", out).group(1))
    assert diff <= 2 / 255  # same weights, scheduler and latents: the two libraries draw the same images


@pytest.mark.parametrize("spatial", [True, False])
def test_unet_flop_count_matches_torch_flop_counter(spatial):
    from common import unet_forward_flops
    from torch.utils.flop_counter import FlopCounterMode

    from t2i.models.unet import UNetModel

    config = {"in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1, 2],
              "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 4, "use_spatial_transformer": spatial,
              "context_dim": 64 if spatial else None, "legacy": False, "use_flash_attention": False}
    model = UNetModel(**config)
    context = torch.randn(2, 8, 64) if spatial else None
    with FlopCounterMode(display=False) as reference, torch.no_grad():
        model(torch.randn(2, 4, 16, 16), torch.zeros(2), context)
    assert unet_forward_flops(config, batch=2, latent_side=16, context_tokens=8) == reference.get_total_flops()


def test_flux_smoke_matches_diffusers_and_prints_a_ratio(capsys):
    import flux_vs_diffusers

    flux_vs_diffusers.main(["--smoke"])
    out = capsys.readouterr().out
    for step in ("forward", "forward+backward"):
        assert re.search(rf"^{re.escape(step)}\s+\d+\.\d", out, re.MULTILINE), out
    assert ratio_of(out) > 0
    diff = float(re.search(r"max \|output diff\| (\S+)", out).group(1))
    assert diff <= 1e-5  # same weights and inputs: the two transformers compute the same velocity


def test_flux_pipeline_smoke_prints_both_libraries_and_a_ratio(capsys):
    import flux_pipeline_vs_diffusers

    flux_pipeline_vs_diffusers.main(["--smoke", "--threads", "1"])
    out = capsys.readouterr().out
    assert re.search(r"max \|image diff\| (\d\.\d+e-0[5-9]|0\.0+e\+00)", out), out  # the same images
    assert ratio_of(out) > 0
