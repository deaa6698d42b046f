"""SDXL pipeline parity with diffusers (the independent reference) on tiny random weights.

A StableDiffusionXLPipeline (two text encoders, text_time UNet) and a StableDiffusionXLImg2ImgPipeline refiner
(bigG alone, aesthetic score, force_zeros_for_empty_prompt false) are built and saved by diffusers, loaded by
`t2i.load_pipeline`, and sampled from the same initial latents: text-to-image with Euler and DPM-Solver++, with and
without a negative prompt (no negative prompt = zeros, diffusers' force_zeros_for_empty_prompt), micro-conditioning
overrides, image-to-image, and base + refiner as an ensemble of experts (denoising_end / denoising_start). Then
t2i's save_pretrained folders load in diffusers and in t2i again with the same images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sd_helpers import SIZE, initial_latents
from sdxl_helpers import load_diffusers_sdxl, tiny_sdxl_pipeline, with_scheduler

import t2i

TOL = 1e-5
PROMPTS = ["a red circle", "circle"]
NEGATIVE = ["red", ""]
SCHEDULER_OF = {
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": "DDIMScheduler",
}


@pytest.fixture(scope="module", autouse=True)
def _quiet(quiet_loaders):
    return quiet_loaders


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl_base")
    tiny_sdxl_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def refiner_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl_refiner")
    tiny_sdxl_pipeline(refiner=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base(base_dir):
    return t2i.load_pipeline(base_dir)


@pytest.fixture(scope="module")
def refiner(refiner_dir):
    return t2i.load_pipeline(refiner_dir)


def reference(folder, sampler, img2img=False, **kwargs):
    """Images (or latents) from diffusers' pipeline of `folder` with `sampler`'s scheduler."""
    pipe, scheduler = load_diffusers_sdxl(folder, img2img)
    with_scheduler(pipe, scheduler, SCHEDULER_OF[sampler])
    kwargs.setdefault("output_type", "np")
    out = pipe(num_inference_steps=kwargs.pop("steps", 4), **kwargs).images
    return out if kwargs["output_type"] == "np" else out.float()


def pixels(out) -> np.ndarray:
    return out.pixels.permute(0, 2, 3, 1).numpy()


def assert_close(ours: np.ndarray, ref: np.ndarray, tol: float = TOL) -> float:
    assert ours.shape == ref.shape
    saturated = np.mean((ref <= 0) | (ref >= 1))
    assert saturated < 0.2, f"reference images are {saturated:.0%} saturated; the comparison would be weak"
    diff = float(np.abs(ours - ref).max())
    assert diff <= tol, diff
    return diff


def test_folder_loads_as_sdxl(base, refiner):
    assert list(base.text_encoders) == ["text_encoder", "text_encoder_2"]
    assert list(refiner.text_encoders) == ["text_encoder_2"] and refiner.text_encoder is None
    assert base.default_sampler == "euler" and base.scale_factor == pytest.approx(0.13025)
    assert base.conditioner.zeros_for_empty_negative and not refiner.conditioner.zeros_for_empty_negative
    inputs = [getattr(e, "input_key", "captions") for e in refiner.conditioner.embedders]
    assert inputs == ["captions", "original_size_as_tuple", "crop_coords_top_left", "aesthetic_score"]


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("negative", [None, NEGATIVE], ids=["no-negative", "negative"])
def test_text_to_image_matches_diffusers(base_dir, base, sampler, negative):
    latents = initial_latents(len(PROMPTS))
    ref = reference(base_dir, sampler, prompt=PROMPTS, negative_prompt=negative, latents=latents.clone(),
                    height=SIZE, width=SIZE, guidance_scale=5.0)  # fmt: skip
    ours = base.generate(PROMPTS, negative_prompt=negative, latents=latents.clone(), height=SIZE, width=SIZE,
                         steps=4, sampler=sampler, guidance_scale=5.0, progress=False)  # fmt: skip
    assert_close(pixels(ours), ref)
    assert np.abs(ref[0] - ref[1]).max() > 0.05, "the prompt must change the image"


def test_micro_conditioning_overrides_match_diffusers(base_dir, base):
    """Every size input with several images per prompt; the sizes must change the image. The negative sizes are
    compared on one image: diffusers repeats the [negative, positive] time-id pair over the doubled batch, which
    gives half of a larger batch's rows the other branch's ids (t2i pairs each row with its own)."""
    latents = initial_latents(4, seed=2)
    micro = {"original_size": (64, 48), "crops_coords_top_left": (8, 4), "target_size": (40, 32)}
    common = {"negative_prompt": NEGATIVE, "height": SIZE, "width": SIZE, "guidance_scale": 4.0}
    ref = reference(base_dir, "euler", prompt=PROMPTS, latents=latents.clone(), num_images_per_prompt=2,
                    **common, **micro)  # fmt: skip
    ours = base.generate(PROMPTS, latents=latents.clone(), steps=4, sampler="euler", num_images=2, progress=False,
                         **common, **micro)  # fmt: skip
    assert_close(pixels(ours), ref)
    plain = base.generate(PROMPTS, latents=latents.clone(), steps=4, sampler="euler", num_images=2, progress=False,
                          **common)  # fmt: skip
    assert np.abs(pixels(plain) - ref).max() > 1e-3

    negative = {**micro, "negative_original_size": (16, 16), "negative_crops_coords_top_left": (0, 2),
                "negative_target_size": (24, 24)}  # fmt: skip
    common["negative_prompt"] = NEGATIVE[:1]
    ref = reference(base_dir, "euler", prompt=PROMPTS[:1], latents=latents[:1].clone(), **common, **negative)
    ours = base.generate(PROMPTS[:1], latents=latents[:1].clone(), steps=4, sampler="euler", progress=False,
                         **common, **negative)  # fmt: skip
    assert_close(pixels(ours), ref)
    assert np.abs(pixels(ours) - pixels(plain)[:1]).max() > 1e-3


def test_refiner_image_to_image_matches_diffusers(refiner_dir, refiner):
    """Img2img with strength; aesthetic scores (6.0 / 2.5 by default, then overridden); the "" encoding as the
    unconditional text (force_zeros_for_empty_prompt false)."""
    from PIL import Image

    image = Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    for scores in ({}, {"aesthetic_score": 3.0, "negative_aesthetic_score": 5.0}):
        ref = reference(refiner_dir, "euler", img2img=True, prompt=PROMPTS[:1], image=image, strength=0.6,
                        steps=5, guidance_scale=5.0, generator=torch.Generator().manual_seed(4), **scores)  # fmt: skip
        ours = refiner.reconstruct(PROMPTS[:1], image, strength=0.6, steps=5, sampler="euler", guidance_scale=5.0,
                                   generator=torch.Generator().manual_seed(4), progress=False, **scores)  # fmt: skip
        assert_close(pixels(ours), ref)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim"])
def test_base_and_refiner_as_an_ensemble_of_experts(base_dir, refiner_dir, base, refiner, sampler):
    """denoising_end=0.7 on the base hands noisy latents (on the scheduler's own scale) to the refiner's
    denoising_start=0.7, as diffusers' ensemble of experts does; the latents agree too."""
    latents = initial_latents(1, seed=5)
    common = {"prompt": PROMPTS[:1], "negative_prompt": ["red"], "guidance_scale": 5.0, "steps": 10}
    ref_latents = reference(base_dir, sampler, latents=latents.clone(), height=SIZE, width=SIZE,
                            denoising_end=0.7, output_type="latent", **common)  # fmt: skip
    ref = reference(refiner_dir, sampler, img2img=True, image=ref_latents, denoising_start=0.7, **common)
    handed = base.generate(latents=latents.clone(), height=SIZE, width=SIZE, sampler=sampler, denoising_end=0.7,
                           output_type="latent", progress=False, **common)  # fmt: skip
    assert handed.images == [] and handed.pixels is None
    # the random UNet's latents reach |x| ~ 40: compare relative to their scale
    assert (handed.latents - ref_latents).abs().max() <= TOL * ref_latents.abs().max()
    ours = refiner.reconstruct(image=handed.latents, denoising_start=0.7, sampler=sampler, progress=False, **common)
    assert_close(pixels(ours), ref)


def test_save_pretrained_round_trips_through_diffusers_and_t2i(tmp_path, base_dir, refiner_dir, base, refiner):
    latents = initial_latents(1, seed=7)
    text = {"prompt": ["a red circle"], "latents": latents.clone(), "height": SIZE, "width": SIZE, "guidance_scale": 5.0}
    ref = reference(base_dir, "euler", **text)
    saved = base.save_pretrained(tmp_path / "base")
    assert (saved / "t2i.yaml").is_file()
    assert_close(reference(saved, "euler", **text), ref)
    again = t2i.load_pipeline(saved)
    assert again.model_config["conditioner_config"] == base.model_config["conditioner_config"]
    assert_close(pixels(again.generate(**{**text, "latents": latents.clone()}, steps=4, progress=False)), ref)

    latents = initial_latents(1, seed=8)
    image = {"prompt": ["red"], "image": latents.clone(), "strength": 0.5, "steps": 6, "guidance_scale": 4.0}
    ref = reference(refiner_dir, "euler", img2img=True, generator=torch.Generator().manual_seed(1), **image)
    saved = refiner.save_pretrained(tmp_path / "refiner")
    import json

    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline" and index["text_encoder"] == [None, None]
    assert index["requires_aesthetics_score"] and not index["force_zeros_for_empty_prompt"]
    assert_close(reference(saved, "euler", img2img=True, generator=torch.Generator().manual_seed(1), **image), ref)
    ours = t2i.load_pipeline(saved).reconstruct(**image, sampler="euler", generator=torch.Generator().manual_seed(1),
                                               progress=False)  # fmt: skip
    assert_close(pixels(ours), ref)


def test_vp_samplers_are_those_whose_diffusers_scheduler_starts_at_unit_scale():
    """Latents handed between base and refiner are on the scheduler's own scale: VP exactly when diffusers'
    init_noise_sigma is 1 (what `conditioning.VP_SAMPLERS` lists)."""
    import diffusers
    from sdxl_helpers import SCHEDULER

    from t2i.diffusion.plans import SCHEDULER_FOR_SAMPLER
    from t2i.pipelines.conditioning import VP_SAMPLERS

    for sampler, (class_name, extra) in SCHEDULER_FOR_SAMPLER.items():
        scheduler = getattr(diffusers, class_name).from_config({**SCHEDULER, **extra})
        scheduler.set_timesteps(10)
        assert (float(scheduler.init_noise_sigma) == 1.0) == (sampler in VP_SAMPLERS), sampler


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"aesthetic_score": 6.0}, "aesthetic_score: this model is not conditioned on it"),
        ({"original_size": (32,)}, "original_size: .*expected two numbers"),
        ({"negative_target_size": "big"}, "negative_target_size"),
        ({"denoising_end": 1.5}, r"denoising_end: 1.5; expected a number in \(0, 1\)"),
        ({"denoising_end": 0.01}, "denoising_end: 0.01 leaves no step"),
        ({"output_type": "np"}, "output_type: 'np'; expected pil or latent"),
        ({"crop": (0, 0)}, "crop: unknown argument"),
    ],
)
def test_bad_sdxl_arguments_are_one_line_errors(base, kwargs, message):
    from t2i.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=message):
        base.generate("red", height=SIZE, width=SIZE, steps=4, progress=False, **kwargs)


def test_refiner_arguments_are_checked(refiner):
    from t2i.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="target_size: this model is not conditioned on it"):
        refiner.reconstruct("red", initial_latents(1), steps=4, target_size=(32, 32), progress=False)
    with pytest.raises(InvalidInputError, match="denoising_start needs latents"):
        refiner.reconstruct("red", torch.rand(1, 3, SIZE, SIZE), steps=4, denoising_start=0.5, progress=False)
    with pytest.raises(InvalidInputError, match="denoising_start: 0.999 leaves no step"):
        refiner.reconstruct("red", initial_latents(1), steps=4, denoising_start=0.999, progress=False)
