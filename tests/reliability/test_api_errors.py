"""Python API mistakes raise a one-line T2IError subclass naming the key, path or value."""

from __future__ import annotations

import math
import traceback

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_one_line


@pytest.mark.silent
def test_lora_file_without_tensors_is_an_error(tmp_path):
    from t2i.errors import LoraError
    from t2i.lora.files import read_lora_file

    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    with pytest.raises(LoraError) as caught:
        read_lora_file(path)
    assert_one_line(caught.value, LoraError, str(path), "holds no tensors")


def test_zero_byte_lora_file_is_an_error(tmp_path):
    from t2i.errors import LoraError
    from t2i.lora.files import read_lora_file

    (tmp_path / "zero.safetensors").write_bytes(b"")
    with pytest.raises(LoraError):
        read_lora_file(tmp_path / "zero.safetensors")


@pytest.mark.silent
@pytest.mark.parametrize(("value", "word"), [(math.nan, "NaN"), (math.inf, "infinite"), (-math.inf, "infinite")])
def test_lora_weights_that_are_not_finite_are_rejected_naming_the_key(tmp_path, value, word):
    from t2i.errors import LoraError
    from t2i.lora.files import read_lora_file

    key = "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"
    bad = torch.zeros(4, 8)
    bad[1, 2] = value
    path = tmp_path / "bad.safetensors"
    save_file({key: bad, key.replace("lora_A", "lora_B"): torch.zeros(8, 4)}, str(path))
    with pytest.raises(LoraError) as caught:
        read_lora_file(path)
    assert_one_line(caught.value, LoraError, key, word)


@pytest.mark.silent
@pytest.mark.parametrize(("override", "key"), [
    ("model.linear_start=0.02", "model.linear_end"),  # start above end (SD's 0.012)
    ("model.linear_end=1.5", "model.linear_end"),
    ("model.cond_stage_config.max_length=0", "model.cond_stage_config.max_length"),  # was silently 32
])  # fmt: skip
def test_config_values_that_were_silently_accepted(override, key):
    from t2i.config import build_config
    from t2i.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        build_config({}, [override])
    assert_one_line(caught.value, ConfigError, f"{key}: expected")


def test_cosine_schedule_ignores_the_linear_betas():
    from t2i.config import build_config

    build_config({}, ["model.beta_schedule=squaredcos_cap_v2", "model.linear_start=0.5"])


@pytest.mark.silent
def test_fsdp_in_a_single_process_says_it_trains_unsharded(tmp_path):
    """FSDP2 runs on CPUs too (tests/train/test_fsdp.py); one process has nothing to shard, and is told so."""
    from train_toy import ToyTask, toy_config

    from t2i.train.trainer import train

    with pytest.warns(UserWarning, match="one process has nothing to shard, training unsharded"):
        sharded = train(toy_config(tmp_path / "fsdp", strategy="fsdp"), ToyTask()).losses
    assert sharded == train(toy_config(tmp_path / "ddp"), ToyTask()).losses


@pytest.mark.traceback
def test_checkpoint_weights_that_do_not_parse(tmp_path):
    from t2i.errors import PipelineLoadError
    from t2i.train.checkpoint import load_weights

    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(PipelineLoadError) as caught:
        load_weights(tmp_path, use_ema=False)
    assert_one_line(caught.value, PipelineLoadError, str(tmp_path / "model.safetensors"))


@pytest.mark.traceback
def test_error_raised_in_a_dataloader_worker_stays_one_line():
    from torch.utils.data import DataLoader, IterableDataset

    from t2i.errors import DataError

    class Failing(IterableDataset):
        def __iter__(self):
            raise DataError("data.train: nothing usable")
            yield  # pragma: no cover

    iterator = iter(DataLoader(Failing(), num_workers=1))
    try:
        next(iterator)
    except DataError as err:
        message = str(err)
        traceback.clear_frames(err.__traceback__)  # lets the worker stop now, not at garbage collection
    del iterator
    assert message == "data.train: nothing usable (in DataLoader worker process 0)"


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    """A tiny random SD pipeline (diffusers-built, see tests/pipelines/sd_helpers.py), loaded by t2i."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
    from sd_helpers import tiny_diffusers_pipeline

    import t2i

    folder = tmp_path_factory.mktemp("tiny_sd")
    tiny_diffusers_pipeline("sd1").save_pretrained(folder)
    return t2i.load_pipeline(folder)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"guidance_scale": "5"}, ("guidance_scale", "finite number")),
    ({"guidance_scale": math.nan}, ("guidance_scale", "finite number")),
    ({"seed": "abc"}, ("seed", "integer")),
    ({"seed": 2**70}, ("seed", "integer")),
    ({"eta": "x"}, ("eta", "finite number")),
    ({"eta": -1.0}, ("eta", "finite number >= 0")),
    ({"sampler": "euler", "eta": 0.5}, ("eta", "not used by sampler 'euler'")),
    ({"stepz": 3}, ("stepz", "unknown argument")),
])  # fmt: skip
def test_generate_rejects_bad_arguments_in_one_line(tiny_pipe, kwargs, words):
    from t2i.errors import InvalidInputError

    with pytest.raises(InvalidInputError) as caught:
        tiny_pipe.generate("red", steps=1, height=32, width=32, progress=False, **kwargs)
    assert_one_line(caught.value, InvalidInputError, *words)


def test_loaders_name_unknown_arguments_and_bad_paths(tmp_path):
    import t2i
    from t2i.errors import InvalidInputError, LoraError, PipelineLoadError
    from t2i.lora.inference import parse_lora_spec

    with pytest.raises(InvalidInputError) as caught:
        t2i.load_pipeline(tmp_path, dtpye=torch.float16)
    assert_one_line(caught.value, InvalidInputError, "dtpye", "did you mean 'dtype'")
    with pytest.raises(PipelineLoadError) as caught:
        t2i.load_pipeline(None)
    assert_one_line(caught.value, PipelineLoadError, "None", "pipeline folder")
    with pytest.raises(LoraError) as caught:
        parse_lora_spec("style.safetensors:abc")
    assert_one_line(caught.value, LoraError, "'abc'", "not a number")
    assert parse_lora_spec("style.safetensors:0.5")[1] == 0.5


def test_lora_scale_must_be_a_finite_number(tiny_pipe):
    from t2i.errors import LoraError

    with pytest.raises(LoraError) as caught:
        tiny_pipe.load_lora("missing.safetensors", scale="x")
    assert_one_line(caught.value, LoraError, "scale", "finite number")


def test_save_pretrained_onto_an_existing_file_is_refused(tiny_pipe, tmp_path):
    from t2i.errors import InvalidInputError

    target = tmp_path / "taken"
    target.write_text("not a folder")
    with pytest.raises(InvalidInputError) as caught:
        tiny_pipe.save_pretrained(target)
    assert_one_line(caught.value, InvalidInputError, str(target), "is a file")
    assert target.read_text() == "not a folder"


def test_text_encoder_max_length_below_one_is_refused():
    from t2i.errors import ConfigError
    from t2i.text.encoders import build_text_encoder

    with pytest.raises(ConfigError) as caught:
        build_text_encoder("minilm", max_length=0)
    assert_one_line(caught.value, ConfigError, "max_length", "integer >= 1")


def test_resolution_that_the_model_cannot_downsample_is_named(tmp_path):
    from t2i.config import build_config
    from t2i.errors import ConfigError
    from t2i.train.tasks.latent import LatentDiffusionTask

    unet = {"in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [2],
            "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2, "context_dim": 384}  # fmt: skip
    model = {"unet_config": unet, "first_stage_key": "image_encoded", "cond_stage_key": "captions_encoded",
             "first_stage_config": {"ddconfig": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1}}}  # fmt: skip
    cfg = build_config({"model": model, "data": {"train": [str(tmp_path)], "resolution": 34}})
    with pytest.raises(ConfigError) as caught:
        LatentDiffusionTask(cfg)
    assert_one_line(caught.value, ConfigError, "data.resolution: 34 is not a multiple of 4", "use 32 or 36")


@pytest.mark.silent
@pytest.mark.parametrize(("override", "key", "words"), [
    ("model.unet_config.attention_resolutions=[16]", "attention_resolutions", "[16] match no level"),
    ("model.unet_config.num_heads=3", "num_heads", "does not divide the 320 channels"),
    ("model.unet_config.num_head_channels=7", "num_head_channels", "does not divide the 320 channels"),
])  # fmt: skip
def test_unet_attention_that_cannot_be_built_is_a_config_error(override, key, words):
    """Before: a stray attention resolution was silently ignored and a non-dividing head count failed deep in a
    Linear's shape check at the first forward."""
    from t2i.config import build_config
    from t2i.errors import ConfigError
    from t2i.pipelines.build import build_unet

    with pytest.raises(ConfigError) as caught:
        build_unet(build_config({}, [override]).model, "meta")
    assert_one_line(caught.value, ConfigError, f"model.unet_config.{key}", words)


def test_truncated_prompts_warn_once_with_the_dropped_token_count():
    import warnings

    from t2i.text.encoders import build_text_encoder
    from t2i.text.tokenize import tokenize, warn_if_truncated

    encoder = build_text_encoder("minilm", max_length=8)
    long_prompt = "a red circle at the top left next to a blue square at the bottom right of a green field"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, _ = tokenize(encoder.tokenizer, [long_prompt, "a red circle"], 8)
        tokenize(encoder.tokenizer, [long_prompt], 8)
    messages = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert len(messages) == 1 and "1 prompt(s) exceed the text encoder's 8 tokens" in messages[0]
    assert ids.shape == (2, 8)
    assert warn_if_truncated(encoder.tokenizer, ["a red circle"], 8) == 0
    assert warn_if_truncated(encoder.tokenizer, [long_prompt], 8) > 0
