"""Typed run configuration: dataclass schemas, YAML loading, dotted `key=value` overrides, validation.

A run config is YAML (NeMo key names) merged over the dataclass defaults, then overrides such as
`trainer.precision=bf16 model.optim.lr=2e-4 data.train=[a.tar,b.tar]` are applied, `${...}` interpolations are
resolved by OmegaConf, and the result is converted into the dataclasses below. `model.kind` selects the model
schema. Every problem raises a one-line `ConfigError` naming the full dotted key, e.g.
`trainer.precision: 'fp8' is not one of 32, bf16, fp16`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from t2i.errors import ConfigError

# ----------------------------------------------------------------------------------------------- schemas


@dataclass
class SchedConfig:
    """Learning-rate schedule: linear warmup from 0, then constant or cosine decay to `min_lr` at max_steps."""

    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0

    def check(self, key: str) -> None:
        _require(self.warmup_steps >= 0, f"{key}.warmup_steps", self.warmup_steps, "an integer >= 0")
        _require(self.min_lr >= 0, f"{key}.min_lr", self.min_lr, "a number >= 0")


@dataclass
class OptimConfig:
    """AdamW hyper-parameters plus the LR schedule."""

    lr: float = 1.0e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    weight_decay: float = 0.01
    sched: SchedConfig = field(default_factory=SchedConfig)

    def check(self, key: str) -> None:
        _require(self.lr > 0, f"{key}.lr", self.lr, "a number > 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{key}.betas", self.betas,
                 "two numbers in [0, 1)")
        _require(self.eps > 0, f"{key}.eps", self.eps, "a number > 0")


PriorLoss = Literal["diffusion", "distill"]
PRIOR_LOSSES: tuple[str, ...] = typing.get_args(PriorLoss)


@dataclass
class LoraPriorConfig:
    """Prior preservation: `num_images` class images per prompt of `class_prompts`, drawn once by the frozen base
    (`steps`, `guidance_scale`); each step adds `loss_weight` x the `loss` on a batch of them (`diffusion`:
    DreamBooth's; `distill`: match the frozen base's prediction)."""

    class_prompts: list[str] = field(default_factory=list)
    num_images: int = 8
    loss_weight: float = 1.0
    loss: PriorLoss = "diffusion"
    steps: int = 25
    guidance_scale: float = 4.0
    # share of each prior batch conditioned on the unconditional text (SD: "", Imagen: none), so that the
    # branch classifier-free guidance subtracts is preserved too
    unconditional_share: float = 0.0

    def check(self, key: str) -> None:
        _require(0 <= self.unconditional_share <= 1, f"{key}.unconditional_share", self.unconditional_share,
                 "a number in [0, 1]")  # fmt: skip
        _require(bool(self.class_prompts), f"{key}.class_prompts", self.class_prompts, "at least one prompt")
        _require(self.num_images >= 1, f"{key}.num_images", self.num_images, "an integer >= 1")
        _require(self.loss_weight >= 0, f"{key}.loss_weight", self.loss_weight, "a number >= 0")
        _require(self.steps >= 1, f"{key}.steps", self.steps, "an integer >= 1")


@dataclass
class LoraConfig:
    """Low-rank adapters on the backbone's attention projections (`target_modules` None = the task's default),
    optionally on the text encoder's attention too (SD family), with optional prior preservation."""

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    train_text_encoder: bool = False
    prior: LoraPriorConfig | None = None

    def check(self, key: str) -> None:
        _require(self.rank >= 1, f"{key}.rank", self.rank, "an integer >= 1")
        _require(0 <= self.dropout < 1, f"{key}.dropout", self.dropout, "a number in [0, 1)")


@dataclass
class UNetConfig:
    """SD UNetModel keyword arguments (openaimodel / sgm names), plus `from_pretrained` (not passed to the model):
    a pipeline folder or UNet weights file whose weights initialise training. Defaults are SD 1.5's.

    This dataclass is the one list of UNet keys and defaults: `UNetModel`, the diffusers converter and the YAML
    loader all take theirs from here. SDXL adds `transformer_depth` per level (a level or a middle block of depth 0
    has no transformer; `transformer_depth_middle` null = the last level's depth), `norm_num_groups` (diffusers'
    name) and the ADM vector input (`num_classes: sequential` with `adm_in_channels`: y (B, adm_in_channels) is
    embedded by `label_emb` and added to the time embedding)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: list[int] = field(default_factory=lambda: [4, 2, 1])
    num_res_blocks: int = 2
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_heads: int = 8
    num_head_channels: int = -1
    use_spatial_transformer: bool = True
    use_linear_in_transformer: bool = False
    transformer_depth: int | list[int] = 1
    transformer_depth_middle: int | None = None
    context_dim: int | None = 768
    num_classes: Literal["sequential"] | None = None
    adm_in_channels: int | None = None
    norm_num_groups: int = 32
    use_checkpoint: bool = False
    legacy: bool = False
    use_flash_attention: bool = True
    dropout: float = 0.0
    image_size: int | None = None
    from_pretrained: str | None = None

    def model_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for `UNetModel(**kwargs)` (everything but `from_pretrained`)."""
        kwargs = dataclasses.asdict(self)
        kwargs.pop("from_pretrained")
        return kwargs


@dataclass
class DDConfig:
    """AutoencoderKL encoder/decoder knobs (CompVis `ddconfig`). Defaults are the SD VAE's."""

    double_z: bool = True
    z_channels: int = 4
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    dropout: float = 0.0


@dataclass
class FirstStageConfig:
    """The SD VAE: `from_pretrained` is a pipeline/VAE folder or weights file; None = random init (tests)."""

    embed_dim: int = 4
    from_pretrained: str | None = None
    ddconfig: DDConfig = field(default_factory=DDConfig)


@dataclass
class CondStageConfig:
    """Text encoder: `kind` picks the family, `path` a local folder (None = the kind's default location)."""

    kind: Literal["clip", "openclip", "t5", "minilm"] = "minilm"
    path: str | None = None
    layer: str | int = "last"
    max_length: int = 77
    arch: str | None = None
    version: str | None = None


@dataclass
class LatentDiffusionConfig:
    """Stable Diffusion family: a discrete-time UNet in a VAE latent space, conditioned on text."""

    kind: Literal["latent_diffusion"] = "latent_diffusion"
    parameterization: Literal["eps", "v", "x0"] = "eps"
    timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    linear_start: float = 0.00085
    linear_end: float = 0.012
    scale_factor: float = 0.18215
    first_stage_key: Literal["images", "image_encoded"] = "images"
    cond_stage_key: Literal["captions", "captions_encoded"] = "captions"
    text_drop_rate: float = 0.1
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    channels_last: bool = False
    inductor: bool = False
    unet_config: UNetConfig = field(default_factory=UNetConfig)
    first_stage_config: FirstStageConfig = field(default_factory=FirstStageConfig)
    cond_stage_config: CondStageConfig = field(default_factory=CondStageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig | None = None

    def check(self, key: str) -> None:
        _require(self.timesteps >= 1, f"{key}.timesteps", self.timesteps, "an integer >= 1")
        _require(0 <= self.text_drop_rate <= 1, f"{key}.text_drop_rate", self.text_drop_rate, "a number in [0, 1]")
        if self.min_snr_gamma is not None:
            _require(self.min_snr_gamma > 0, f"{key}.min_snr_gamma", self.min_snr_gamma, "null or a number > 0")


@dataclass
class AutoencoderLossConfig:
    """VAE training loss: pixel reconstruction + KL (+ optional perceptual and adversarial terms)."""

    pixel_loss: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1.0e-6
    perceptual_weight: float = 0.0
    disc_weight: float = 0.0
    disc_start: int = 0


@dataclass
class AutoencoderConfig:
    """Training (or fine-tuning) the first-stage AutoencoderKL itself."""

    kind: Literal["autoencoder"] = "autoencoder"
    embed_dim: int = 4
    from_pretrained: str | None = None
    ddconfig: DDConfig = field(default_factory=DDConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    channels_last: bool = False
    inductor: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class ImagenConfig:
    """Imagen cascade stage. The nested NeMo sections stay dicts here; the imagen builders validate their keys."""

    kind: Literal["imagen"] = "imagen"
    unet_type: Literal["base", "sr-unet", "sr"] = "base"
    unet: dict[str, Any] = field(default_factory=dict)
    preconditioning_type: Literal["EDM", "DDPM"] = "EDM"
    preconditioning: dict[str, Any] = field(default_factory=dict)
    conditioning: dict[str, Any] = field(default_factory=dict)
    noise_cond_aug: dict[str, Any] | bool | None = None
    channels_last: bool = False
    inductor: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    # a stage folder (or a t2i run folder with one under export/) whose weights initialise the UNet
    from_pretrained: str | None = None
    lora: LoraConfig | None = None  # LoRA on the from_pretrained stage; only the adapters train


ModelConfig = LatentDiffusionConfig | AutoencoderConfig | ImagenConfig
MODEL_SCHEMAS: dict[str, type] = {
    "latent_diffusion": LatentDiffusionConfig,
    "autoencoder": AutoencoderConfig,
    "imagen": ImagenConfig,
}


@dataclass
class DataConfig:
    """Training data: webdataset shards (paths, globs, brace patterns) or an image folder."""

    train: list[str] = field(default_factory=list)
    resolution: int = 256
    center_crop: bool = True
    random_flip: bool = False
    batch_size: int = 4
    num_workers: int = 0
    shuffle_buffer: int = 1000

    def __post_init__(self) -> None:
        if isinstance(self.train, str):  # `data.train=shards/` on the command line means a one-item list
            self.train = [self.train]

    def check(self, key: str) -> None:
        _require(self.resolution >= 1, f"{key}.resolution", self.resolution, "an integer >= 1")
        _require(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "an integer >= 1")
        _require(self.num_workers >= 0, f"{key}.num_workers", self.num_workers, "an integer >= 0")


@dataclass
class EMAConfig:
    """Exponential moving average of the model weights; sampling and export use it."""

    enabled: bool = True
    decay: float = 0.9999
    start_step: int = 0
    warmup: bool = True  # decay min(decay, (1 + n) / (10 + n)) at the n-th averaged step, as diffusers' EMAModel

    def check(self, key: str) -> None:
        _require(0 <= self.decay < 1, f"{key}.decay", self.decay, "a number in [0, 1)")
        _require(self.start_step >= 0, f"{key}.start_step", self.start_step, "an integer >= 0")


_PRECISION_ALIASES = {32: "32", "32-true": "32", "fp32": "32", 16: "fp16", "16": "fp16", "16-mixed": "fp16",
                      "bf16-mixed": "bf16"}


@dataclass
class TrainerConfig:
    """The generic training loop's knobs (see t2i.train.trainer)."""

    precision: Literal["32", "bf16", "fp16"] = field(default="32", metadata={"aliases": _PRECISION_ALIASES})
    strategy: Literal["ddp", "fsdp"] = "ddp"
    max_steps: int = 1000
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    log_every: int = 10
    sample_every: int = 200
    sample_prompts: list[str] = field(default_factory=list)
    checkpoint_every: int = 500
    keep_last: int = 3
    out_dir: str = "runs/${name}"
    resume: str | None = None
    progress_bar: bool = True
    ema: EMAConfig = field(default_factory=EMAConfig)

    def check(self, key: str) -> None:
        for name in ("max_steps", "grad_accum", "keep_last"):
            _require(getattr(self, name) >= 1, f"{key}.{name}", getattr(self, name), "an integer >= 1")
        for name in ("log_every", "sample_every", "checkpoint_every"):
            _require(getattr(self, name) >= 0, f"{key}.{name}", getattr(self, name), "an integer >= 0 (0 = never)")
        if self.grad_clip is not None:
            _require(self.grad_clip >= 0, f"{key}.grad_clip", self.grad_clip, "null or a number >= 0 (0 = off)")


@dataclass
class RunConfig:
    """A whole run: `model.kind` picks the model schema; `trainer.out_dir` defaults to runs/<name>."""

    name: str = "run"
    seed: int = 0
    model: ModelConfig = field(default_factory=LatentDiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# ----------------------------------------------------------------------------------------------- loading

CONFIG_ROOTS = (Path(__file__).resolve().parents[2] / "configs", Path(__file__).resolve().parent / "configs")


def load_config(path_or_name: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML file (or a bare name like `sd15` / `sd/sd15` under configs/), apply `key=value` overrides."""
    raw = _read_yaml(resolve_config_path(path_or_name))
    return build_config(raw, overrides or [])


def build_config(raw: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Merge a plain (unresolved) dict and overrides over the schema defaults and validate the result."""
    merged = _deep_merge(raw, parse_overrides(overrides or []))
    kind = (merged.get("model") or {}).get("kind", "latent_diffusion") if isinstance(merged.get("model"), dict) \
        else "latent_diffusion"
    schema = MODEL_SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise ConfigError(f"model.kind: {kind!r} is not one of {', '.join(MODEL_SCHEMAS)}")
    defaults = config_to_dict(RunConfig(model=schema()))
    return _to_dataclass(RunConfig, _resolve(_deep_merge(defaults, merged)), "")


def resolve_config_path(path_or_name: str | Path) -> Path:
    """A path to an existing file, or a bare name / relative name found as configs/**/NAME.yaml."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    name = str(path_or_name).removesuffix(".yaml").removesuffix(".yml")
    for root in CONFIG_ROOTS:
        exact = root / f"{name}.yaml"
        if exact.is_file():
            return exact
        found = sorted(root.glob(f"**/{name}.yaml")) if root.is_dir() else []
        if len(found) > 1:
            names = ", ".join(str(p.relative_to(root).with_suffix("")) for p in found)
            raise ConfigError(f"config {name!r} is ambiguous; use one of {names}")
        if found:
            return found[0]
    raise ConfigError(f"config {str(path_or_name)!r}: no such file and no configs/**/{name}.yaml; "
                      f"available: {', '.join(available_configs()) or 'none'}")


def available_configs() -> list[str]:
    """Names (relative to configs/, no suffix) of the bundled configs."""
    names: set[str] = set()
    for root in CONFIG_ROOTS:
        if root.is_dir():
            names.update(str(p.relative_to(root).with_suffix("")) for p in root.glob("**/*.yaml"))
    return sorted(names)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=[x,y]"]` -> `{"a": {"b": 1}, "c": ["x", "y"]}`; values are parsed as YAML."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    result: dict[str, Any] = {}
    for item in overrides:
        key, sep, _ = item.lstrip("+").partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key=value (e.g. trainer.precision=bf16)")
        try:
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item.lstrip("+")]), resolve=False)
        except (OmegaConfBaseException, yaml.YAMLError, ValueError) as err:
            raise ConfigError(f"override {item!r}: cannot parse value ({_first_line(err)})") from None
        result = _deep_merge(result, parsed)
    return result


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OmegaConfBaseException, yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML ({_first_line(err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; lists and scalars in `update` replace those in `base`."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve(data: dict[str, Any]) -> dict[str, Any]:
    """Resolve `${...}` interpolations; a failure names the key holding it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(OmegaConf.create(data), resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(f"{key}: cannot resolve interpolation ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    text = " ".join(str(err).split())  # YAML parser messages span several lines
    return text[:200] if text else type(err).__name__


# ----------------------------------------------------------------------------------------------- validation


def _to_dataclass(cls: type, data: Any, key: str) -> Any:
    """Build dataclass `cls` from a plain dict, checking every key and value; `key` is the dotted prefix."""
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            raise ConfigError(_unknown_key_message(_join(key, str(name)), str(name), list(fields)))
    values = {}
    for name, spec in fields.items():
        if name in data:
            values[name] = _coerce(hints[name], data[name], _join(key, name), spec.metadata.get("aliases", {}))
    obj = cls(**values)
    if hasattr(obj, "check"):
        obj.check(key)
    return obj


def _coerce(tp: Any, value: Any, key: str, aliases: dict[Any, Any] | None = None) -> Any:
    """Check `value` against type hint `tp` and return it converted (dicts -> dataclasses, ints -> floats)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(args, value, key, aliases)
    if origin is Literal:
        return _coerce_choice(args, value, key, aliases or {})
    if dataclasses.is_dataclass(tp):
        return _to_dataclass(tp, value, key)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str) and key == "data.train":
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        return [_coerce(item_type, item, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return _coerce_scalar(tp, value, key)


def _coerce_scalar(tp: type, value: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _coerce_union(args: tuple, value: Any, key: str, aliases: dict[Any, Any] | None) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got null")
    options = [a for a in args if a is not type(None)]
    if all(dataclasses.is_dataclass(a) and "kind" in {f.name for f in dataclasses.fields(a)} for a in options):
        schemas = {_kind_of(a): a for a in options}
        kind = value.get("kind") if isinstance(value, dict) else None
        if kind not in schemas:
            raise ConfigError(f"{key}.kind: {kind!r} is not one of {', '.join(schemas)}")
        return _to_dataclass(schemas[kind], value, key)
    if len(options) == 1:  # X | None: X's own error names the inner key that is wrong
        return _coerce(options[0], value, key, aliases)
    for option in options:
        try:
            return _coerce(option, value, key, aliases)
        except ConfigError:
            continue
    raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")


def _coerce_choice(choices: tuple, value: Any, key: str, aliases: dict[Any, Any]) -> Any:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = aliases.get(value, value)
    if value in choices and not isinstance(value, bool):
        return value
    raise ConfigError(f"{key}: {value!r} is not one of {', '.join(str(c) for c in choices)}")


def _kind_of(schema: type) -> str:
    return typing.get_args(typing.get_type_hints(schema)["kind"])[0]


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(str(c) for c in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _unknown_key_message(full_key: str, name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{full_key}: unknown key{hint}; valid keys: {', '.join(valid)}"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


# ----------------------------------------------------------------------------------------------- output


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain nested dicts/lists (YAML- and JSON-ready)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text (what `t2i train --print-config` shows and checkpoints store)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(config_to_dict(cfg)))


def save_resolved(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config YAML to `path` (the parent must exist)."""
    path = Path(path)
    path.write_text(to_yaml(cfg))
    return path
