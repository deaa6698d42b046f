"""Bad input gives a typed T2IError in Python and one clear line (exit 2, no traceback) on the CLI."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from sd_helpers import SIZE, single_file_from_diffusers, tiny_sd1_yaml

import t2i
from t2i.cli.main import main
from t2i.errors import (
    InvalidInputError,
    PipelineLoadError,
    T2IError,
    UnknownSamplerError,
    WeightsMismatchError,
)


@pytest.fixture(scope="module")
def sd1(sd1_dir):
    return t2i.load_pipeline(sd1_dir)


@pytest.fixture(scope="module")
def single_file(sd1_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    unet_config = single_file_from_diffusers(sd1_dir, folder / "tiny.safetensors")
    tiny_sd1_yaml(sd1_dir, unet_config, folder / "tiny.yaml")
    return folder


def broken_file(single_file, drop: str | None = None, add: str | None = None):
    state = load_file(single_file / "tiny.safetensors")
    if drop:
        state.pop(drop)
    if add:
        state[add] = torch.zeros(2)
    path = single_file / "broken.safetensors"
    save_file(state, path)
    return path


def test_missing_path_and_non_pipeline_folder(tmp_path):
    with pytest.raises(PipelineLoadError, match="no such file or folder"):
        t2i.load_pipeline(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineLoadError, match="not a pipeline folder"):
        t2i.load_pipeline(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(PipelineLoadError, match="unknown file type"):
        t2i.load_pipeline(tmp_path / "notes.txt")


def test_single_file_needs_a_config_and_readable_tensors(tmp_path, single_file):
    with pytest.raises(PipelineLoadError, match="needs config="):
        t2i.load_pipeline(single_file / "tiny.safetensors")
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineLoadError, match="weights_only"):
        t2i.load_pipeline(tmp_path / "bad.ckpt", config=single_file / "tiny.yaml")


def test_missing_and_unexpected_weight_keys_are_named(single_file):
    cfg = single_file / "tiny.yaml"
    dropped = "model.diffusion_model.out.2.weight"
    with pytest.raises(WeightsMismatchError, match=r"missing \['out\.2\.weight'\]"):
        t2i.load_pipeline(broken_file(single_file, drop=dropped), config=cfg)
    with pytest.raises(WeightsMismatchError, match="unexpected.*input_blocks.99.weight"):
        t2i.load_pipeline(
            broken_file(single_file, add="model.diffusion_model.input_blocks.99.weight"), config=cfg
        )
    with pytest.raises(WeightsMismatchError, match="unexpected keys.*optimizer.state"):
        t2i.load_pipeline(broken_file(single_file, add="optimizer.state"), config=cfg)
    with pytest.raises(WeightsMismatchError, match="VAE.*first_stage_model|missing.*decoder"):
        t2i.load_pipeline(
            broken_file(single_file, drop="first_stage_model.decoder.conv_out.bias"), config=cfg
        )


def test_wrong_architecture_config_names_the_shape(single_file):
    with pytest.raises(WeightsMismatchError, match="shape"):
        t2i.load_pipeline(
            single_file / "tiny.safetensors",
            config=single_file / "tiny.yaml",
            overrides=["model.unet_config.context_dim=64"],
        )


def test_single_file_without_tokenizer_folder(single_file):
    with pytest.raises(PipelineLoadError, match="cond_stage_config.path"):
        t2i.load_pipeline(
            single_file / "tiny.safetensors",
            config=single_file / "tiny.yaml",
            overrides=["model.cond_stage_config.path=null"],
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"sampler": "nope"}, UnknownSamplerError, "valid samplers: .*ddim.*euler"),
        ({"height": 30}, InvalidInputError, "height: 30 is not a positive multiple of 4"),
        ({"width": 0}, InvalidInputError, "width"),
        ({"prompt": []}, InvalidInputError, "prompt: empty list"),
        ({"prompt": ["a", 3]}, InvalidInputError, "list of strings"),
        ({"steps": 0}, InvalidInputError, "steps"),
        ({"num_images": 0}, InvalidInputError, "num_images"),
        ({"negative_prompt": ["a", "b", "c"], "prompt": ["x", "y"]}, InvalidInputError, "negative_prompt"),
        ({"latents": torch.zeros(1, 4, 3, 3)}, InvalidInputError, "latents: shape"),
        ({"eta": 0.5, "sampler": "euler"}, InvalidInputError, "eta"),
    ],
)
def test_generate_rejects_bad_input(sd1, kwargs, error, message):
    args = {"prompt": "a red circle", "height": SIZE, "width": SIZE, "steps": 2, "progress": False, **kwargs}
    with pytest.raises(error, match=message):
        sd1.generate(**args)


def test_reconstruct_rejects_bad_strength_and_image(sd1):
    image = torch.rand(1, 3, SIZE, SIZE)
    with pytest.raises(InvalidInputError, match="strength"):
        sd1.reconstruct("x", image, strength=1.5, steps=2, progress=False)
    with pytest.raises(InvalidInputError, match="leaves no step"):
        sd1.reconstruct("x", image, strength=0.1, steps=2, progress=False)
    with pytest.raises(InvalidInputError, match="image"):
        sd1.reconstruct("x", "not an image", steps=2, progress=False)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "{tmp}/nope"], "no such file or folder"),
        (["--model", "{tmp}"], "not a pipeline folder"),
        (["--model", "{sd1}", "--sampler", "nope"], "valid samplers"),
        (["--model", "{sd1}", "--height", "30"], "multiple of 4"),
        (["--model", "{single}/broken.safetensors", "--config", "{single}/tiny.yaml"], "missing"),
        (["--model", "{sd1}", "--init-image", "{tmp}/none.png"], "init-image"),
    ],
)
def test_cli_errors_are_one_line(capsys, tmp_path, sd1_dir, single_file, argv, message):
    broken_file(single_file, drop="model.diffusion_model.out.2.weight")
    paths = {"tmp": tmp_path, "sd1": sd1_dir, "single": single_file}
    argv = [a.format(**paths) for a in argv]
    base = ["--prompt", "x", "--out", str(tmp_path / "o.png"), "--steps", "2", "--device", "cpu"]
    code, err = run_cli(capsys, "sample", *argv, *base)
    assert code == 2
    assert err.startswith("t2i sample: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert issubclass(UnknownSamplerError, T2IError)


@pytest.mark.parametrize(("in_channels", "kind"), [(5, "depth-to-image"), (7, "a UNet with extra input channels")])
def test_unets_with_inputs_t2i_cannot_feed_fail_at_load_with_one_line(tmp_path, capsys, in_channels, kind):
    """A depth (5-channel) UNet used to load and then crash with a raw RuntimeError at the first sampling step.
    (Inpainting and InstructPix2Pix UNets sample: tests/pipelines/test_editing.py.)"""
    from diffusers import UNet2DConditionModel
    from sd_helpers import tiny_diffusers_pipeline

    pipe = tiny_diffusers_pipeline("sd1")
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "in_channels": in_channels})
    pipe.save_pretrained(tmp_path / "folder")
    with pytest.raises(PipelineLoadError) as caught:
        t2i.load_pipeline(tmp_path / "folder")
    message = str(caught.value)
    assert "\n" not in message and f"unet.in_channels: {in_channels} is" in message and kind in message
    assert main(["sample", "--model", str(tmp_path / "folder"), "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 2
    assert kind in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_clip_head_count_is_read_from_the_folder_or_the_guess_is_refused(single_file, sd1_dir, tmp_path):
    """The tiny CLIP is 32 wide with 4 heads: width/64 would give 1 head and silently different images."""
    import shutil

    shutil.copytree(sd1_dir / "tokenizer", tmp_path / "tokenizer")  # a tokenizer, but no text_encoder/config.json
    with pytest.raises(PipelineLoadError) as caught:
        t2i.load_pipeline(single_file / "tiny.safetensors", config=single_file / "tiny.yaml",
                          overrides=[f"model.cond_stage_config.path={tmp_path / 'tokenizer'}"])  # fmt: skip
    message = str(caught.value)
    assert "width 32 is no released CLIP" in message and "head count" in message and "\n" not in message
    pipe = t2i.load_pipeline(single_file / "tiny.safetensors", config=single_file / "tiny.yaml")
    assert pipe.text_encoder.model.config.num_attention_heads == 4  # read from sd1_dir/text_encoder/config.json


@pytest.mark.parametrize(
    ("option", "value"),
    [("time_cond_proj_dim", 32), ("class_embed_type", "timestep"), ("num_class_embeds", 10)],
)
def test_lcm_and_class_conditioned_unets_fail_at_load_with_one_line(tmp_path, capsys, option, value):
    """LCM-distilled UNets (a guidance embedding) and class-conditioned ones (the x4 upscaler's noise level) are
    not sampled here: refused at load, naming the option, never sampled without their extra input."""
    from diffusers import UNet2DConditionModel
    from sd_helpers import tiny_diffusers_pipeline

    pipe = tiny_diffusers_pipeline("sd1")
    config = {k: v for k, v in pipe.unet.config.items() if k != "_use_default_values"}  # else it resets `option`
    pipe.unet = UNet2DConditionModel.from_config({**config, option: value})
    pipe.save_pretrained(tmp_path / "folder")
    with pytest.raises(T2IError) as caught:
        t2i.load_pipeline(tmp_path / "folder")
    assert option in str(caught.value) and "\n" not in str(caught.value)
    capsys.readouterr()
    assert main(["sample", "--model", str(tmp_path / "folder"), "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert option in err and err.count("\n") == 1 and not (tmp_path / "x.png").exists()
