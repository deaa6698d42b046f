"""The Flux pipeline against diffusers' FluxPipeline on the same tiny random weights (the reference): loading a
diffusers folder, images at two embedded guidance scales, true CFG with a negative prompt, a model without
guidance embedding, seeds drawn as diffusers draws them; saving a folder diffusers loads; BFL single files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flux_pipeline_helpers import (
    SIZE,
    T5_LENGTH,
    diffusers_images,
    initial_latents,
    load_diffusers,
    save_tiny,
    t2i_images,
)

import t2i
from t2i.errors import InvalidInputError, PipelineLoadError
from t2i.pipelines.flux import FluxPipeline

pytest.importorskip("diffusers")
TOLERANCE = 1e-4  # float32 pixels; measured max differences are ~1e-6


@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("flux-dev"), guidance=True)


@pytest.fixture(scope="module")
def schnell_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("flux-schnell"), guidance=False, seed=1, shift=False)


def load(folder) -> FluxPipeline:
    pipe = t2i.load_pipeline(folder)
    pipe.context_encoder.max_length = T5_LENGTH  # diffusers' max_sequence_length below
    return pipe


@pytest.mark.parametrize("guidance_scale", [2.0, 5.0])
def test_guidance_distilled_images_match_diffusers(dev_folder, guidance_scale):
    pipe = load(dev_folder)
    assert isinstance(pipe, FluxPipeline) and pipe.guidance_distilled
    prompts = ["a red circle in the top left", "a blue square"]
    latents = initial_latents(2, seed=3)
    ours = t2i_images(pipe, prompts, latents, steps=4, guidance_scale=guidance_scale)
    theirs = diffusers_images(dev_folder, prompts, latents, steps=4, guidance_scale=guidance_scale)
    assert ours.std() > 0.01  # real images, not a constant
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE)


def test_guidance_scale_changes_the_image(dev_folder):
    pipe = load(dev_folder)
    a = t2i_images(pipe, "a red circle", initial_latents(), guidance_scale=2.0)
    b = t2i_images(pipe, "a red circle", initial_latents(), guidance_scale=5.0)
    assert np.abs(a - b).max() > 1e-3


def test_true_cfg_with_negative_prompt_matches_diffusers(dev_folder):
    pipe = load(dev_folder)
    kwargs = {"guidance_scale": 3.5, "true_cfg_scale": 3.0, "negative_prompt": "blurry photo"}
    ours = t2i_images(pipe, "a red circle", initial_latents(seed=5), steps=3, **kwargs)
    theirs = diffusers_images(dev_folder, "a red circle", initial_latents(seed=5), steps=3, **kwargs)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE)
    plain = t2i_images(pipe, "a red circle", initial_latents(seed=5), steps=3, guidance_scale=3.5)
    assert np.abs(ours - plain).max() > 1e-3


def test_model_without_guidance_embedding_matches_diffusers(schnell_folder):
    """schnell-like: no guidance embedding, no shift; guidance_scale there is classifier-free guidance, which
    diffusers calls true_cfg_scale."""
    pipe = load(schnell_folder)
    assert not pipe.guidance_distilled
    ours = t2i_images(pipe, "a blue square", initial_latents(seed=2), steps=2, guidance_scale=1.0)
    theirs = diffusers_images(schnell_folder, "a blue square", initial_latents(seed=2), steps=2)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE)
    ours = t2i_images(pipe, "a blue square", initial_latents(seed=2), steps=2, guidance_scale=4.0,
                      negative_prompt="a red circle")  # fmt: skip
    theirs = diffusers_images(schnell_folder, "a blue square", initial_latents(seed=2), steps=2,
                              true_cfg_scale=4.0, negative_prompt="a red circle")  # fmt: skip
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE)


def test_seeded_noise_is_drawn_as_diffusers_draws_it(dev_folder):
    pipe = load(dev_folder)
    ours = pipe.generate("a red circle", height=SIZE, width=SIZE, steps=2, seed=11, progress=False)
    theirs = load_diffusers(dev_folder)(
        "a red circle", num_inference_steps=2, height=SIZE, width=SIZE, max_sequence_length=T5_LENGTH,
        generator=torch.Generator().manual_seed(11), output_type="np",
    ).images  # fmt: skip
    np.testing.assert_allclose(ours.pixels.permute(0, 2, 3, 1).numpy(), theirs, rtol=0, atol=TOLERANCE)


def test_heun_sampler_runs_flow_heun(dev_folder):
    pipe = load(dev_folder)
    assert pipe.plan("heun", 4, SIZE, SIZE).sampler == "flow_heun"
    out = t2i_images(pipe, "a red circle", initial_latents(), steps=4, sampler="heun")
    assert np.isfinite(out).all()


def test_save_pretrained_round_trips_and_diffusers_loads_it(dev_folder, tmp_path):
    pipe = load(dev_folder)
    saved = pipe.save_pretrained(tmp_path / "saved")
    assert (saved / "t2i.yaml").is_file()
    again = t2i.load_pipeline(saved)
    assert again.context_encoder.max_length == T5_LENGTH  # t2i.yaml keeps the token length
    latents = initial_latents(seed=4)
    expected = t2i_images(pipe, "a red circle", latents, guidance_scale=3.0)
    np.testing.assert_allclose(t2i_images(again, "a red circle", latents, guidance_scale=3.0), expected, atol=0)
    theirs = diffusers_images(saved, "a red circle", latents, guidance_scale=3.0)
    np.testing.assert_allclose(theirs, expected, rtol=0, atol=TOLERANCE)


def test_single_file_loads_with_a_config(dev_folder, tmp_path):
    from omegaconf import OmegaConf

    from t2i.convert.flux_diffusers import save_flux_single_file

    pipe = load(dev_folder)
    file = save_flux_single_file(pipe.transformer, tmp_path / "flux-tiny.safetensors")
    model = OmegaConf.to_container(OmegaConf.load(pipe.save_pretrained(tmp_path / "ref") / "t2i.yaml"))["model"]
    model["first_stage_config"]["from_pretrained"] = str(dev_folder / "vae")
    model["context_encoder"]["path"] = str(dev_folder / "text_encoder_2")
    model["pooled_encoder"]["path"] = str(dev_folder / "text_encoder")
    single = t2i.load_pipeline(file, config={"model": model})
    latents = initial_latents(seed=6)
    # the same weights; BLAS rounds differently on the file's (unaligned) tensors: measured 6e-7
    np.testing.assert_allclose(
        t2i_images(single, "a blue square", latents), t2i_images(pipe, "a blue square", latents), atol=TOLERANCE
    )
    del model["first_stage_config"]["from_pretrained"]
    with pytest.raises(PipelineLoadError, match="first_stage_config.from_pretrained"):
        t2i.load_pipeline(file, config={"model": model})


def test_bad_inputs_name_what_was_expected(dev_folder):
    pipe = load(dev_folder)
    with pytest.raises(InvalidInputError, match="unpacked noise"):
        pipe.generate("a", latents=torch.zeros(1, 64, 64), height=SIZE, width=SIZE, progress=False)
    with pytest.raises(InvalidInputError, match="multiple of 4"):
        pipe.generate("a", height=30, width=SIZE, progress=False)
    with pytest.raises(InvalidInputError, match="guidance_scale"):
        pipe.generate("a", height=SIZE, width=SIZE, guidance_scale=float("nan"), progress=False)
    with pytest.raises(InvalidInputError, match="unknown argument 'guidence_scale' \\(did you mean 'guidance_scale'"):
        pipe.generate("a", guidence_scale=3.0)


def test_save_pretrained_onto_a_file_is_refused(dev_folder, tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(InvalidInputError, match="is a file"):
        load(dev_folder).save_pretrained(tmp_path / "taken")


def test_info_on_a_flux_folder_counts_what_loads(dev_folder):
    from t2i.cli.info import describe
    from t2i.pipelines.build import count_parameters

    pipe = load(dev_folder)
    counts = describe(str(dev_folder))
    assert counts["transformer"] == ("FluxTransformer", count_parameters(pipe.transformer))
    assert counts["context_encoder"] == ("T5EncoderModel", count_parameters(pipe.context_encoder.model))
    assert counts["pooled_encoder"][1] == count_parameters(pipe.pooled_encoder.model)


def test_sample_cli_on_a_flux_folder(dev_folder, tmp_path, capsys):
    from PIL import Image

    from t2i.cli.main import main

    out = tmp_path / "flux.png"
    args = ["sample", "--model", str(dev_folder), "--prompt", "a red circle", "--steps", "2", "--height", "32",
            "--width", "32", "--seed", "0", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert Image.open(out).size == (SIZE, SIZE)
    assert main([*args, "--init-image", str(out)]) == 2
    assert "not available for Flux" in capsys.readouterr().err
