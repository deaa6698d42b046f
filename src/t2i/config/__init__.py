"""Typed run configuration: dataclass schemas, YAML loading, dotted `key=value` overrides, validation.

A run config is YAML (NeMo key names) merged over the dataclass defaults, then overrides such as
`trainer.precision=bf16 model.optim.lr=2e-4 data.train=[a.tar,b.tar]` are applied, `${...}` interpolations are
resolved by OmegaConf, and the result is converted into the dataclasses of this package. `model.kind` selects the
model schema. Every problem raises a one-line `ConfigError` naming the full dotted key, e.g.
`trainer.precision: 'fp8' is not one of 32, bf16, fp16`.

Modules: `common` (optimiser, LoRA), `latent` (SD family, autoencoder), `imagen` (Imagen stages), `flow`
(rectified-flow transformers: Flux), `run` (data, trainer, the whole run), `validation` (dict -> dataclass
checking), `loading` (YAML, overrides, output).
"""

from t2i.config.common import PRIOR_LOSSES, LoraConfig, LoraPriorConfig, OptimConfig, SchedConfig
from t2i.config.flow import (
    FlowConfig,
    FlowFirstStageConfig,
    FlowLossConfig,
    FlowScheduleConfig,
    FlowTextConfig,
    FluxTransformerConfig,
)
from t2i.config.imagen import (
    ContinuousDDPMConfig,
    EDMConfig,
    EfficientUNetConfig,
    ImagenConditioningConfig,
    ImagenConfig,
    ImagenUNetConfig,
    NoiseAugConfig,
)
from t2i.config.latent import (
    AutoencoderConfig,
    AutoencoderLossConfig,
    ConditionerConfig,
    CondStageConfig,
    DDConfig,
    EmbedderConfig,
    FirstStageConfig,
    LatentDiffusionConfig,
    SizeEmbedderConfig,
    UNetConfig,
)
from t2i.config.loading import (
    CONFIG_ROOTS,
    available_configs,
    build_config,
    config_to_dict,
    load_config,
    parse_overrides,
    resolve_config_path,
    save_resolved,
    to_yaml,
)
from t2i.config.run import (
    MODEL_SCHEMAS,
    BucketConfig,
    DataConfig,
    EMAConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    TrainerConfig,
)

__all__ = [
    "CONFIG_ROOTS",
    "MODEL_SCHEMAS",
    "PRIOR_LOSSES",
    "AutoencoderConfig",
    "AutoencoderLossConfig",
    "BucketConfig",
    "CondStageConfig",
    "ConditionerConfig",
    "ContinuousDDPMConfig",
    "DDConfig",
    "DataConfig",
    "EDMConfig",
    "EMAConfig",
    "EfficientUNetConfig",
    "EmbedderConfig",
    "EvalConfig",
    "FirstStageConfig",
    "FlowConfig",
    "FlowFirstStageConfig",
    "FlowLossConfig",
    "FlowScheduleConfig",
    "FlowTextConfig",
    "FluxTransformerConfig",
    "ImagenConditioningConfig",
    "ImagenConfig",
    "ImagenUNetConfig",
    "LatentDiffusionConfig",
    "LoraConfig",
    "LoraPriorConfig",
    "ModelConfig",
    "NoiseAugConfig",
    "OptimConfig",
    "RunConfig",
    "SampleConfig",
    "SchedConfig",
    "SizeEmbedderConfig",
    "TrainerConfig",
    "UNetConfig",
    "available_configs",
    "build_config",
    "config_to_dict",
    "load_config",
    "parse_overrides",
    "resolve_config_path",
    "save_resolved",
    "to_yaml",
]
