"""Zero terminal SNR (`rescale_betas_zero_snr`) with `trailing` spacing and `guidance_rescale`, as released
v-prediction fine-tunes ship them, against diffusers' StableDiffusionPipeline on the same random weights."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from sd_helpers import diffusers_images, initial_latents, t2i_images, tiny_diffusers_pipeline

import t2i
from t2i.diffusion.schedules import DiscreteSchedule
from t2i.errors import InvalidInputError

# At zero terminal SNR the first sigma is ~4096 (alpha_bar_T = 2^-24, as diffusers' Euler and DPM-Solver set it so
# that sigma stays finite): latents of that size carry float32 rounding of ~5e-4, which both implementations round
# differently (measured: Euler 3.2e-5, Euler ancestral 2.1e-5, DPM-Solver++ 2.8e-6 on [0, 1] pixels). diffusers'
# DDIM keeps alpha_bar_T = 0 exactly; on the VE scale t2i samples on, the first x0 estimate then carries 2^-12 of
# the noise (measured 8.7e-5).
TOL = {None: 2e-4, "euler": 1e-4, "euler_ancestral": 1e-4, "dpmpp_2m": 1e-5}


@pytest.fixture(scope="module")
def zero_snr_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zero_snr")
    pipe = tiny_diffusers_pipeline("sd2")
    config = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}  # else it resets ours
    config |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    pipe.scheduler = diffusers.DDIMScheduler.from_config(config)
    assert pipe.scheduler.config.rescale_betas_zero_snr
    pipe.save_pretrained(folder)
    return folder


def test_schedule_reaches_zero_snr_like_diffusers():
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
              "rescale_betas_zero_snr": True}  # fmt: skip
    ours = DiscreteSchedule.from_scheduler_config(config).alphas_cumprod
    reference = diffusers.DDIMScheduler.from_config(config).alphas_cumprod
    assert torch.allclose(ours[:-1], reference[:-1], rtol=1e-6, atol=0)
    assert float(reference[-1]) == 0.0 and 0 < float(ours[-1]) <= 2.0**-24  # finite last sigma (~4096)
    assert torch.allclose(ours, diffusers.EulerDiscreteScheduler.from_config(config).alphas_cumprod)


@pytest.mark.parametrize(
    ("scheduler_class", "sampler"),
    [(None, None), ("EulerDiscreteScheduler", "euler"), ("EulerAncestralDiscreteScheduler", "euler_ancestral"),
     ("DPMSolverMultistepScheduler", "dpmpp_2m")],
)  # fmt: skip
def test_zero_snr_and_guidance_rescale_match_diffusers(zero_snr_dir, scheduler_class, sampler):
    pipe = t2i.load_pipeline(zero_snr_dir)
    images = {}
    for rescale in (0.0, 0.7):
        kwargs = {"guidance_rescale": rescale, "generator": torch.Generator().manual_seed(0)}
        ref = diffusers_images(zero_snr_dir, scheduler_class, "a red circle", initial_latents(), steps=4, **kwargs)
        kwargs["generator"] = torch.Generator().manual_seed(0)
        images[rescale] = t2i_images(pipe, "a red circle", initial_latents(), steps=4, sampler=sampler, **kwargs)
        assert np.abs(images[rescale] - ref).max() <= TOL[sampler], rescale
    assert np.abs(images[0.7] - images[0.0]).max() > 1e-3  # the rescale is not a no-op


def test_guidance_rescale_is_checked(zero_snr_dir):
    pipe = t2i.load_pipeline(zero_snr_dir)
    with pytest.raises(InvalidInputError, match=r"guidance_rescale: 1.5; expected a number in \[0, 1\]"):
        pipe.generate("a", steps=1, guidance_rescale=1.5, progress=False)


def test_cli_guidance_rescale(zero_snr_dir, tmp_path):
    from PIL import Image

    from t2i.cli.main import main

    out = tmp_path / "x.png"
    assert main(["sample", "--model", str(zero_snr_dir), "--prompt", "a red circle", "--guidance-rescale", "0.7",
                 "--steps", "2", "--seed", "4", "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    expected = t2i.load_pipeline(zero_snr_dir).generate("a red circle", steps=2, seed=4, guidance_rescale=0.7,
                                                        progress=False)  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected.images[0]))


def test_zero_terminal_snr_round_trips_through_configs_and_saved_folders(zero_snr_dir, tmp_path):
    """A diffusers zero-SNR folder -> model config `zero_terminal_snr: true` -> a saved folder whose scheduler
    diffusers reads back as zero SNR with trailing spacing; training builds the same schedule."""
    from t2i.pipelines.build import as_model_config
    from t2i.pipelines.sd_folder import scheduler_config_from_model

    pipe = t2i.load_pipeline(zero_snr_dir)
    model = as_model_config(pipe.model_config)
    assert model.zero_terminal_snr is True
    config = scheduler_config_from_model(model, "ddim")
    reference = diffusers.DDIMScheduler.from_config(config)
    assert reference.config.rescale_betas_zero_snr and reference.config.timestep_spacing == "trailing"
    assert float(reference.alphas_cumprod[-1]) == 0.0
    assert torch.allclose(DiscreteSchedule.from_model_config(model).alphas_cumprod[:-1], reference.alphas_cumprod[:-1])
    pipe.save_pretrained(tmp_path / "saved")
    saved = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "saved"), safety_checker=None)
    assert saved.scheduler.config.rescale_betas_zero_snr
