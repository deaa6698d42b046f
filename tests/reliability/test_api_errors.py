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
def test_fsdp_in_a_single_cpu_process_is_a_config_error(tmp_path):
    from train_toy import ToyTask, toy_config

    from t2i.errors import ConfigError
    from t2i.train.trainer import train

    with pytest.raises(ConfigError) as caught:
        train(toy_config(tmp_path, strategy="fsdp"), ToyTask())
    assert_one_line(caught.value, ConfigError, "trainer.strategy: 'fsdp' needs CUDA devices", "single process")
    assert not list(tmp_path.iterdir())  # refused before anything was written


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
