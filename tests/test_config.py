"""Config loading: schema defaults, bundled names, dotted overrides, one-line errors naming the key."""

from __future__ import annotations

import pytest

from t2i.config import (
    AutoencoderConfig,
    ContinuousDDPMConfig,
    EfficientUNetConfig,
    ImagenConfig,
    ImagenUNetConfig,
    LatentDiffusionConfig,
    RunConfig,
    available_configs,
    build_config,
    config_to_dict,
    load_config,
    parse_overrides,
    save_resolved,
    to_yaml,
)
from t2i.errors import ConfigError
from t2i.models.imagen_unet import EfficientUNet, ImagenUNet


def test_bundled_names_resolve_and_fill_defaults():
    cfg = load_config("sd15")
    assert cfg == load_config("sd/sd15")
    assert isinstance(cfg.model, LatentDiffusionConfig)
    assert cfg.model.unet_config.context_dim == 768 and cfg.model.cond_stage_config.kind == "clip"
    assert cfg.data.resolution == 512 and cfg.data.batch_size == 4  # from the file / from the schema
    assert cfg.trainer.out_dir == "runs/sd15"  # ${name} interpolation
    assert "from_pretrained" not in cfg.model.unet_config.model_kwargs()


def test_every_bundled_config_loads():
    names = available_configs()
    assert "sd/sd15" in names
    for name in names:
        cfg = load_config(name)
        assert cfg.model.kind in {"latent_diffusion", "autoencoder", "imagen", "flow"}, name


def test_imagen_and_autoencoder_schemas():
    cfg = load_config("imagen/base64-500m")
    assert isinstance(cfg.model, ImagenConfig) and cfg.model.unet.per_head_channels == 64
    assert cfg.model.preconditioning_type == "EDM" and cfg.model.conditioning.token_length == 128
    vae = build_config({"model": {"kind": "autoencoder", "ddconfig": {"ch": 32}}})
    assert isinstance(vae.model, AutoencoderConfig) and vae.model.ddconfig.ch == 32


def test_imagen_sections_are_typed_and_picked_by_their_sibling_keys():
    """unet_type picks the backbone schema, preconditioning_type the preconditioning schema; a section of
    another schema's keys is a one-line error naming the key; every default shows in the resolved YAML."""
    sr = load_config("imagen/sr256-600m").model
    assert isinstance(sr.unet, EfficientUNetConfig) and sr.unet.kind == "efficient" and sr.augments_low_res
    ddpm = build_config({"model": {"kind": "imagen", "preconditioning_type": "DDPM",
                                   "unet": {"embed_dim": 8, "image_size": 16, "text_embed_dim": 384}}}).model  # fmt: skip
    assert isinstance(ddpm.preconditioning, ContinuousDDPMConfig) and ddpm.preconditioning.noise_schedule == "cosine"
    with pytest.raises(ConfigError, match=r"model.unet.atnn_enabled_at: unknown key"):
        build_config({"model": {"kind": "imagen", "unet": {"embed_dim": 8, "image_size": 16,
                                                           "atnn_enabled_at": [1]}}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"model.unet.kind: 'efficient' does not match unet_type 'base'"):
        build_config({"model": {"kind": "imagen", "unet": {"kind": "efficient", "embed_dim": 8, "image_size": 16}}})
    with pytest.raises(ConfigError, match="model.unet.image_size: missing"):
        build_config({"model": {"kind": "imagen", "unet": {"embed_dim": 8, "text_embed_dim": 384}}})
    printed = to_yaml(load_config("imagen/base64-500m"))
    for key in ("stable_attention:", "resample_with_conv:", "sigma_max:", "encoder_kind:", "max_level:"):
        assert key in printed


def test_the_model_level_noise_cond_aug_of_older_configs_reads_as_noise_aug():
    base = {"kind": "imagen", "unet_type": "sr-unet", "unet": {"embed_dim": 8, "image_size": 16, "text_embed_dim": 384}}
    old = build_config({"model": {**base, "noise_cond_aug": {"per_sample": False}}}).model
    assert old.noise_aug.per_sample is False and not old.augments_low_res  # unet.noise_cond_aug is false
    assert build_config({"model": {**base, "noise_cond_aug": True}}).model.augments_low_res


@pytest.mark.parametrize(("schema", "model"), [(ImagenUNetConfig, ImagenUNet), (EfficientUNetConfig, EfficientUNet)])
def test_imagen_unet_schemas_mirror_the_constructors(schema, model):
    """One set of keys and defaults: the typed section has the backbone's keyword arguments and defaults (low_res_cond
    is null in the schema, meaning the unet_type's default, which build_imagen_unet applies)."""
    import dataclasses
    import inspect

    params = {n: p for n, p in inspect.signature(model.__init__).parameters.items()
              if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}  # fmt: skip
    fields = {f.name: f for f in dataclasses.fields(schema) if f.name != "kind"}
    assert sorted(fields) == sorted(params)
    for name, field in fields.items():
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        expected = params[name].default
        if expected is inspect.Parameter.empty or (name == "low_res_cond" and default is None):
            assert default is None, name
        else:
            assert default == (list(expected) if isinstance(expected, tuple) else expected), name


def test_overrides_parse_yaml_values():
    cfg = load_config("sd15", ["trainer.precision=bf16", "model.unet_config.use_checkpoint=False",
                               "model.optim.lr=2e-4", "data.train=[a.tar,b.tar]", "model.lora.rank=8",
                               "trainer.grad_clip=null", "name=other"])
    assert cfg.trainer.precision == "bf16" and cfg.model.unet_config.use_checkpoint is False
    assert cfg.model.optim.lr == pytest.approx(2e-4) and cfg.data.train == ["a.tar", "b.tar"]
    assert cfg.model.lora.rank == 8 and cfg.model.lora.alpha == 4.0
    assert cfg.trainer.grad_clip is None and cfg.trainer.out_dir == "runs/other"
    assert load_config("sd15", ["data.train=shards/"]).data.train == ["shards/"]
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


def test_precision_aliases():
    assert build_config({"trainer": {"precision": 32}}).trainer.precision == "32"
    assert build_config({"trainer": {"precision": 16}}).trainer.precision == "fp16"
    assert build_config({"trainer": {"precision": "bf16-mixed"}}).trainer.precision == "bf16"


@pytest.mark.parametrize("overrides, message", [
    (["trainer.precision=fp8"], "trainer.precision: 'fp8' is not one of 32, bf16, fp16"),
    (["model.unet_config.foo=1"], "model.unet_config.foo: unknown key; valid keys: in_channels, out_channels"),
    (["model.unet_config.model_chanels=8"],
     "model.unet_config.model_chanels: unknown key (did you mean 'model_channels'?)"),
    (["trainer.max_steps=abc"], "trainer.max_steps: expected an integer, got 'abc'"),
    (["trainer.max_steps=0"], "trainer.max_steps: expected an integer >= 1, got 0"),
    (["model.optim.betas=[0.9]"], "model.optim.betas: expected two numbers in [0, 1), got [0.9]"),
    (["model.kind=gan"], "model.kind: 'gan' is not one of latent_diffusion, autoencoder, imagen"),
    (["model.parameterization=eps2"], "model.parameterization: 'eps2' is not one of eps, v, x0"),
    (["model.unet_config.use_checkpoint=3"], "model.unet_config.use_checkpoint: expected a boolean, got 3"),
    (["data.train=3"], "data.train: expected a list, got 3"),
    (["model.unet_config.channel_mult=[1,x]"], "model.unet_config.channel_mult[1]: expected an integer, got 'x'"),
    (["trainer.ema=5"], "trainer.ema: expected a mapping, got 5"),
    (["trainer.max_steps"], "override 'trainer.max_steps': expected key=value"),
    (["data.train=[a"], "override 'data.train=[a': cannot parse value (while parsing a flow sequence"),
    (["trainer.out_dir=${nope}"], "trainer.out_dir: cannot resolve interpolation"),
    (["trainer.strategy=deepspeed"], "trainer.strategy: 'deepspeed' is not one of ddp, fsdp"),
])
def test_errors_are_one_line_and_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("sd15", overrides)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_missing_config_lists_available(tmp_path):
    with pytest.raises(ConfigError, match=r"config 'nope': no such file .* available: .*sd/sd15"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(bad)


def test_yaml_round_trip(tmp_path):
    cfg = load_config("sd21-v", ["trainer.precision=fp16", "model.lora.rank=2", "data.train=[x.tar]"])
    path = save_resolved(cfg, tmp_path / "resolved.yaml")
    again = load_config(path)
    assert again == cfg and isinstance(again, RunConfig)
    assert to_yaml(again) == path.read_text()
    assert config_to_dict(cfg)["model"]["unet_config"]["num_head_channels"] == 64
