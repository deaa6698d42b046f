"""Whole-pipeline parity with diffusers' StableDiffusionPipeline (the independent reference).

Tiny random SD1-style (eps, conv projections, PNDM config) and SD2-style (v prediction, linear projections,
DDIM config with trailing spacing) pipelines are built and saved by diffusers, loaded by `t2i.load_pipeline`, and
sampled from the same initial latents; images must agree within 2/255. Round trips: diffusers folder -> t2i ->
save_pretrained -> diffusers, and single file (CompVis keys) -> t2i -> save_pretrained -> diffusers.
"""

from __future__ import annotations

import numpy as np
import pytest
from sd_helpers import (
    SIZE,
    diffusers_images,
    initial_latents,
    single_file_from_diffusers,
    t2i_images,
    tiny_sd1_yaml,
)

import t2i

TOL = 2 / 255
PROMPTS = ["a red circle", "circle"]
NEGATIVE = ["red", ""]
SCHEDULER_OF = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
}


@pytest.fixture(scope="module", autouse=True)
def _quiet_loaders():
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="module")
def folders(sd1_dir, sd2_dir):
    return {"sd1": sd1_dir, "sd2": sd2_dir}


@pytest.fixture(scope="module")
def t2i_pipes(folders):
    return {style: t2i.load_pipeline(folder) for style, folder in folders.items()}


def assert_close_images(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape == (ours.shape[0], SIZE, SIZE, 3)
    saturated = np.mean((ref <= 0) | (ref >= 1))
    assert saturated < 0.2, f"reference images are {saturated:.0%} saturated; the comparison would be weak"
    assert np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize("style", ["sd1", "sd2"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m", "plms"])
def test_diffusers_folder_matches_diffusers(folders, t2i_pipes, style, sampler):
    latents = initial_latents(len(PROMPTS))
    ref = diffusers_images(
        folders[style],
        SCHEDULER_OF[sampler],
        PROMPTS,
        latents.clone(),
        negative_prompt=NEGATIVE,
        guidance_scale=6.0,
    )
    ours = t2i_images(
        t2i_pipes[style],
        PROMPTS,
        latents.clone(),
        sampler=sampler,
        negative_prompt=NEGATIVE,
        guidance_scale=6.0,
    )
    assert_close_images(ours, ref)
    assert np.abs(ours[0] - ours[1]).max() > 10 * TOL, "the prompt must change the image"


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_default_sampler_is_the_folders_scheduler(folders, t2i_pipes, style):
    """No sampler given: the scheduler config's own class (PNDM -> plms, DDIM -> ddim), empty-string uncond."""
    pipe = t2i_pipes[style]
    assert pipe.default_sampler == {"sd1": "plms", "sd2": "ddim"}[style]
    latents = initial_latents(1, seed=3)
    ref = diffusers_images(folders[style], None, "red", latents.clone(), steps=4)
    ours = t2i_images(pipe, "red", latents.clone(), steps=4)
    assert_close_images(ours, ref)


def test_num_images_per_prompt_and_no_guidance_match_diffusers(folders, t2i_pipes):
    latents = initial_latents(4, seed=5)
    ref = diffusers_images(
        folders["sd1"],
        "EulerDiscreteScheduler",
        PROMPTS,
        latents.clone(),
        steps=2,
        num_images_per_prompt=2,
        guidance_scale=1.0,
    )
    ours = t2i_images(
        t2i_pipes["sd1"], PROMPTS, latents.clone(), steps=2, sampler="euler", num_images=2, guidance_scale=1.0
    )
    assert_close_images(ours, ref)


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_diffusers_to_t2i_to_diffusers_round_trip(tmp_path, folders, t2i_pipes, style):
    saved = t2i_pipes[style].save_pretrained(tmp_path / "export")
    assert (saved / "t2i.yaml").is_file()
    latents = initial_latents(1, seed=7)
    ref = diffusers_images(folders[style], None, "a red circle", latents.clone())
    again = diffusers_images(saved, None, "a red circle", latents.clone())
    assert_close_images(again, ref)
    reloaded = t2i.load_pipeline(saved)
    assert reloaded.default_sampler == t2i_pipes[style].default_sampler
    assert_close_images(t2i_images(reloaded, "a red circle", latents.clone()), ref)


def test_single_file_to_t2i_to_diffusers(tmp_path, sd1_dir):
    unet_config = single_file_from_diffusers(sd1_dir, tmp_path / "tiny.safetensors")
    tiny_sd1_yaml(sd1_dir, unet_config, tmp_path / "tiny.yaml")
    pipe = t2i.load_pipeline(tmp_path / "tiny.safetensors", config=tmp_path / "tiny.yaml")
    assert pipe.default_sampler == "ddim"
    latents = initial_latents(1, seed=11)
    # The single file's schedule is SD's (leading, steps_offset 1): diffusers' DDIM on the source folder agrees.
    ref = diffusers_images(sd1_dir, "DDIMScheduler", "a red circle", latents.clone())
    assert_close_images(t2i_images(pipe, "a red circle", latents.clone()), ref)
    saved = pipe.save_pretrained(tmp_path / "export")
    assert_close_images(diffusers_images(saved, None, "a red circle", latents.clone()), ref)


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_dpm_solver_with_karras_sigmas_matches_diffusers_to_1e5(folders, t2i_pipes, style):
    """DPM-Solver++(2M) with Karras sigmas feeds the model rounded timesteps in diffusers; the plan configures the
    pipeline's denoiser to do the same (off by up to 7e-4 per pixel when it did not)."""
    latents = initial_latents(len(PROMPTS), seed=13)
    scheduler = ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True})
    ref = diffusers_images(folders[style], scheduler, PROMPTS, latents.clone(), steps=10,
                           negative_prompt=NEGATIVE, guidance_scale=6.0)  # fmt: skip
    ours = t2i_images(t2i_pipes[style], PROMPTS, latents.clone(), steps=10, sampler="dpmpp_2m",
                      use_karras_sigmas=True, negative_prompt=NEGATIVE, guidance_scale=6.0)  # fmt: skip
    assert ours.shape == ref.shape and np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde"])
def test_ancestral_samplers_draw_their_noise_as_diffusers_does(folders, t2i_pipes, sampler):
    """Stochastic samplers keep their own eta unless one is given (generate's eta used to default to 0, which
    made them deterministic and 0.4-0.9 per pixel away from diffusers); with the same generator seed the step
    noise is diffusers'."""
    import torch

    latents = initial_latents(len(PROMPTS), seed=17)
    scheduler = {"euler_ancestral": "EulerAncestralDiscreteScheduler",
                 "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"})}[sampler]
    ref = diffusers_images(folders["sd1"], scheduler, PROMPTS, latents.clone(), steps=6, guidance_scale=6.0,
                           generator=torch.Generator().manual_seed(3))  # fmt: skip
    ours = t2i_images(t2i_pipes["sd1"], PROMPTS, latents.clone(), steps=6, sampler=sampler, guidance_scale=6.0,
                      generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert np.abs(ours - ref).max() <= 1e-5
