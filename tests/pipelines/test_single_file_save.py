"""Single files written by t2i (`save_single_file`, `t2i export --format single-file`) in the original layouts:
sgm for SDXL (`conditioner.embedders.0.transformer.*`, `conditioner.embedders.1.model.*`), CompVis for SD 1/2.

The reference is diffusers' `from_single_file(path, config=LOCAL_FOLDER)` (offline: HF_HUB_OFFLINE is set by
tests/conftest.py and every config is local), which must give the images of the folder the file came from; t2i
reads its own files back (and re-saving gives the same tensors).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sd_helpers import SIZE, initial_latents, tiny_diffusers_pipeline
from sdxl_helpers import tiny_sdxl_pipeline

import t2i
from t2i.cli.main import main

TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _offline(monkeypatch_module, quiet_loaders):
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("single_file_sources")
    tiny_sdxl_pipeline().save_pretrained(root / "base")
    tiny_sdxl_pipeline(refiner=True).save_pretrained(root / "refiner")
    tiny_diffusers_pipeline("sd1").save_pretrained(root / "sd1")
    return root


def images(pipe, **kwargs) -> np.ndarray:
    """diffusers (output_type np) or t2i (pixels) images, (B, H, W, 3) in [0, 1]."""
    if isinstance(pipe, t2i.pipelines.latent.LatentPipeline):
        return pipe.generate(**kwargs, progress=False).pixels.permute(0, 2, 3, 1).numpy()
    pipe.set_progress_bar_config(disable=True)
    steps = kwargs.pop("steps")
    return pipe(**kwargs, num_inference_steps=steps, output_type="np").images


def text_to_image(seed: int) -> dict:
    return {"prompt": ["a red circle"], "negative_prompt": ["red"], "latents": initial_latents(1, seed=seed),
            "height": SIZE, "width": SIZE, "steps": 3, "guidance_scale": 5.0}  # fmt: skip


def sdxl_overrides(folder, refiner: bool) -> list[str]:
    """Tokenizer (and config) folders of the text embedders: the diffusers folder's text_encoder[_2]/."""
    names = ["text_encoder_2"] if refiner else ["text_encoder", "text_encoder_2"]
    return [f"model.conditioner_config.emb_models.{i}.emb_model.path={folder / n}" for i, n in enumerate(names)]


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_sdxl_single_file_loads_in_diffusers_and_t2i(tmp_path, folders, refiner):
    import diffusers

    source = folders / ("refiner" if refiner else "base")
    pipe = t2i.load_pipeline(source)
    path = t2i.save_single_file(pipe, tmp_path / "sdxl.safetensors")
    state = load_file(str(path))
    towers = {k.split(".")[2] + "." + k.split(".")[3] for k in state if k.startswith("conditioner.")}
    assert towers == ({"0.model"} if refiner else {"0.transformer", "1.model"})
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in state or refiner
    assert any(k.endswith("model.transformer.resblocks.0.attn.in_proj_weight") for k in state)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.")) for k in state)

    cls = diffusers.StableDiffusionXLImg2ImgPipeline if refiner else diffusers.StableDiffusionXLPipeline
    folder_pipe = cls.from_pretrained(str(source), add_watermarker=False)
    file_pipe = cls.from_single_file(str(path), config=str(source), local_files_only=True, add_watermarker=False)
    if refiner:
        call = {"prompt": ["red"], "image": initial_latents(1, seed=2), "strength": 0.6, "steps": 5,
                "guidance_scale": 4.0}  # fmt: skip
        ref = images(folder_pipe, **call, generator=torch.Generator().manual_seed(0))
        theirs = images(file_pipe, **call, generator=torch.Generator().manual_seed(0))
    else:
        ref = images(folder_pipe, **text_to_image(1))
        theirs = images(file_pipe, **text_to_image(1))
    assert np.abs(theirs - ref).max() <= TOL

    config = pipe.save_pretrained(tmp_path / "folder") / "t2i.yaml"
    again = t2i.load_pipeline(path, config=config, overrides=sdxl_overrides(source, refiner))
    assert list(again.text_encoders) == list(pipe.text_encoders) and again.default_sampler == "euler"
    if refiner:
        ours = again.reconstruct(**call, sampler="euler", generator=torch.Generator().manual_seed(0), progress=False)
        ours = ours.pixels.permute(0, 2, 3, 1).numpy()
    else:
        ours = images(again, **text_to_image(1), sampler="euler")
    assert np.abs(ours - ref).max() <= TOL
    resaved = load_file(str(again.save_single_file(tmp_path / "again.safetensors")))
    assert set(resaved) == set(state) and all(torch.equal(resaved[k], state[k]) for k in state)


def test_sd1_single_file_loads_in_diffusers_and_t2i(tmp_path, folders):
    import diffusers
    from sd_helpers import tiny_sd1_yaml

    source = folders / "sd1"
    pipe = t2i.load_pipeline(source)
    path = pipe.save_single_file(tmp_path / "sd1.safetensors", dtype=torch.float32)
    state = load_file(str(path))
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in state
    folder_pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(source), safety_checker=None)
    file_pipe = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(source),
                                                                   local_files_only=True, safety_checker=None)  # fmt: skip
    ref = images(folder_pipe, **text_to_image(3))
    assert np.abs(images(file_pipe, **text_to_image(3)) - ref).max() <= TOL
    tiny_sd1_yaml(source, pipe.unet.unet_config, tmp_path / "sd1.yaml")
    again = t2i.load_pipeline(path, config=tmp_path / "sd1.yaml")
    assert np.abs(images(again, **text_to_image(3), sampler="plms") - ref).max() <= TOL


def test_sd2_openclip_single_file_round_trips_exactly(tmp_path, sd2_dir):
    """An SD 2 file (OpenCLIP tower under cond_stage_model.model.) loads and saves back to the same tensors."""
    from test_loading import sd2_single_file, sd2_yaml

    unet_config = sd2_single_file(sd2_dir, tmp_path / "sd2.ckpt", nemo=False)
    sd2_yaml(sd2_dir, unet_config, tmp_path / "sd2.yaml", layer="penultimate")
    pipe = t2i.load_pipeline(tmp_path / "sd2.ckpt", config=str(tmp_path / "sd2.yaml"))
    original = torch.load(tmp_path / "sd2.ckpt", weights_only=True)["state_dict"]
    original = {k: v for k, v in original.items() if "." in k}  # without the schedule buffer
    saved = load_file(str(pipe.save_single_file(tmp_path / "sd2.safetensors")))
    assert any(k.startswith("cond_stage_model.model.transformer.resblocks.") for k in saved)
    assert set(saved) == set(original)
    assert all(torch.equal(saved[k], original[k].contiguous()) for k in saved)


def test_export_cli_writes_a_single_file_from_a_pipeline_folder(tmp_path, folders, capsys):
    out = tmp_path / "base.safetensors"
    assert main(["export", str(folders / "base"), "--out", str(out), "--format", "single-file",
                 "--dtype", "float16"]) == 0  # fmt: skip
    state = load_file(str(out))
    assert {v.dtype for v in state.values()} == {torch.float16}
    expected = load_file(str(t2i.load_pipeline(folders / "base").save_single_file(tmp_path / "f32.safetensors")))
    assert set(state) == set(expected) and all(torch.equal(state[k], expected[k].half()) for k in state)
    assert main(["info", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    index = json.loads((folders / "base" / "model_index.json").read_text())
    assert [line.split(":")[0] for line in lines[1:]] == ["unet", "vae", "text_encoder", "text_encoder_2"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert main(["export", str(folders / "base"), "--out", str(tmp_path / "x.bin"), "--format", "single-file"]) == 2
    assert ".safetensors" in capsys.readouterr().err
