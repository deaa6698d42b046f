"""Reading run configs: YAML files (or bundled names) merged over the schema defaults, dotted `key=value`
overrides, `${...}` interpolations resolved by OmegaConf, the result validated into dataclasses; and writing the
resolved config back as YAML."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from t2i.config.run import MODEL_SCHEMAS, RunConfig
from t2i.config.validation import discriminated_defaults, renamed_keys, to_dataclass
from t2i.errors import ConfigError

# The repository's configs/ (a source checkout) and the copy installed as package data.
CONFIG_ROOTS = (Path(__file__).resolve().parents[3] / "configs", Path(__file__).resolve().parents[1] / "configs")


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
    if isinstance(merged.get("model"), dict):
        merged["model"] = renamed_keys(schema, merged["model"])  # before the defaults fill the new names
        defaults["model"] |= discriminated_defaults(schema, merged["model"])
    return to_dataclass(RunConfig, _resolve(_deep_merge(defaults, merged)), "")


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


def _deep_merge(base: dict[str, Any], update: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Recursive dict merge; lists and scalars in `update` replace those in `base`, except that a mapping with
    integer keys updates a list item by item (`emb_models.1.ucg_rate=0` from the command line)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value, f"{where}{key}.")
        elif isinstance(value, dict) and isinstance(merged.get(key), list) and value and all(
            str(k).isdigit() for k in value
        ):
            merged[key] = _merge_list_items(merged[key], value, f"{where}{key}")
        else:
            merged[key] = value
    return merged


def _merge_list_items(items: list[Any], update: dict[str, Any], where: str) -> list[Any]:
    """`items` with item `int(k)` merged with (a mapping) or replaced by (anything else) `update[k]`."""
    items = list(items)
    for k, value in update.items():
        index = int(k)
        if index >= len(items):
            raise ConfigError(f"{where}.{k}: index out of range; the list has {len(items)} items")
        if isinstance(value, dict) and isinstance(items[index], dict):
            items[index] = _deep_merge(items[index], value, f"{where}.{k}.")
        else:
            items[index] = value
    return items


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
