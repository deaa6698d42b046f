"""The `kind: flow` schema: bundled Flux configs, the transformer section mirrors FluxTransformer's keyword
arguments (and FLUX.1's presets), one-line errors naming the key."""

from __future__ import annotations

import inspect

import pytest

from t2i.config import FlowConfig, FluxTransformerConfig, build_config, load_config
from t2i.errors import ConfigError
from t2i.models.flux import FLUX_DEV, FLUX_SCHNELL, FluxTransformer


def test_transformer_section_mirrors_the_model_signature():
    params = inspect.signature(FluxTransformer.__init__).parameters
    kwargs = FluxTransformerConfig().model_kwargs()
    assert set(kwargs) == set(params) - {"self"}
    for name, value in kwargs.items():
        default = params[name].default
        assert (list(default) if isinstance(default, tuple) else default) == value, name


@pytest.mark.parametrize(("name", "preset"), [("flux/flux-dev", FLUX_DEV), ("flux/flux-schnell", FLUX_SCHNELL)])
def test_bundled_flux_configs_are_flux1(name, preset):
    cfg = load_config(name).model
    assert isinstance(cfg, FlowConfig)
    kwargs = cfg.transformer_config.model_kwargs()
    kwargs.pop("use_checkpoint")
    assert kwargs == preset
    assert cfg.context_encoder.kind == "t5" and not cfg.context_encoder.attention_mask
    assert cfg.pooled_encoder.kind == "clip" and cfg.pooled_encoder.max_length == 77
    assert (cfg.scale_factor, cfg.shift_factor, cfg.first_stage_config.embed_dim) == (0.3611, 0.1159, 16)
    assert cfg.schedule.use_dynamic_shifting == preset["guidance_embed"]  # dev shifts with the size, schnell not


def test_tiny_config_uses_minilm_for_both_text_inputs():
    cfg = load_config("flux/flux-tiny").model
    assert cfg.context_encoder.kind == "minilm" and cfg.pooled_encoder is None
    assert cfg.transformer_config.context_in_dim == cfg.transformer_config.vec_in_dim == 384
    assert cfg.transformer_config.guidance_embed is False and cfg.text_drop_rate > 0


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"transformer_config": {"hiden_size": 8}}, "model.transformer_config.hiden_size: unknown key"),
        ({"transformer_config": {"kind": "mmdit"}}, "model.transformer_config.kind: 'mmdit' is not one of flux"),
        ({"transformer_config": {"in_channels": 16}}, "model.transformer_config.in_channels"),
        ({"loss": {"weighting_scheme": "lognorm"}}, "model.loss.weighting_scheme: 'lognorm' is not one of"),
        ({"schedule": {"shift": 0}}, "model.schedule.shift"),
        ({"pooled_encoder": {"attention_mask": "no"}}, "model.pooled_encoder.attention_mask: expected a boolean"),
    ],
)
def test_bad_keys_are_one_line_errors(model, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"model": {"kind": "flow", **model}})
