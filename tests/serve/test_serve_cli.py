"""`t2i serve` arguments: model ids, bad flags and bad model paths are one-line errors (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from t2i.cli.main import main
from t2i.errors import ConfigError
from t2i.serve.settings import ModelSpec, ServerSettings


def test_model_ids_come_from_the_folder_or_name():
    assert ModelSpec.parse("runs/demo/pipeline") == ModelSpec("pipeline", Path("runs/demo/pipeline"))
    assert ModelSpec.parse("sd=models/v1-5.safetensors") == ModelSpec("sd", Path("models/v1-5.safetensors"))
    assert ModelSpec.parse("models/v1-5.safetensors").id == "v1-5"
    with pytest.raises(ConfigError, match="model id"):
        ModelSpec.parse("a b=path")


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="repeat"):
        ServerSettings(models=[ModelSpec("a", Path("x")), ModelSpec("a", Path("y"))]).validate()
    with pytest.raises(ConfigError, match="--max-batch"):
        ServerSettings(models=[ModelSpec("a", Path("x"))], max_batch=0).validate()


@pytest.mark.parametrize("args", [
    ["--model", "does/not/exist"],
    ["--model", "x", "--max-batch", "0"],
    ["--model", "x", "--max-queue", "-1"],
    ["--model", "x", "--timeout", "0"],
    ["--model", "x", "--lora-dir", "does/not/exist"],
])
def test_bad_arguments_exit_2_with_one_line(args, capsys):
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("t2i serve: error: ")


def test_a_folder_that_is_no_pipeline_is_one_line(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("t2i serve: error: ")


def test_api_key_comes_from_the_environment(monkeypatch):
    import argparse

    from t2i.cli.serve import register, settings_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    monkeypatch.setenv("T2I_API_KEY", "from-env")
    assert settings_from_args(parser.parse_args(["serve", "--model", "m"])).api_key == "from-env"
    assert settings_from_args(parser.parse_args(["serve", "--model", "m", "--api-key", "k"])).api_key == "k"
    monkeypatch.delenv("T2I_API_KEY")
    args = parser.parse_args(["serve", "--model", "m"])
    assert settings_from_args(args).api_key is None and args.host == "127.0.0.1"
