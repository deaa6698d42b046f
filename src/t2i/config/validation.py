"""Typed-dataclass validation: a plain dict (parsed YAML) becomes a config dataclass, every key and value checked,
every problem a one-line `ConfigError` naming the full dotted key.

Unions of dataclasses that each have a `kind: Literal[...]` field are picked by the mapping's `kind` value (a
schema whose Literal lists several values serves each of them). A field
may instead be picked by a sibling key (NeMo's `preconditioning_type` picks `preconditioning`'s schema): its
metadata `{"kind_from": (sibling, {sibling value: kind})}` names the sibling and maps its values to kinds.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from t2i.errors import ConfigError


def to_dataclass(cls: type, data: Any, key: str) -> Any:
    """Build dataclass `cls` from a plain dict, checking every key and value; `key` is the dotted prefix."""
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {data!r}")
    data = renamed_keys(cls, data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            raise ConfigError(_unknown_key_message(_join(key, str(name)), str(name), list(fields)))
    values = {}
    for name, spec in fields.items():
        if name in data:
            value = _with_sibling_kind(spec, data, data[name], fields, _join(key, name))
            values[name] = _coerce(hints[name], value, _join(key, name), spec.metadata.get("aliases", {}))
    obj = cls(**values)
    if hasattr(obj, "check"):
        obj.check(key)
    return obj


def renamed_keys(cls: type, data: dict) -> dict:
    """`data` with the keys a schema renamed (its `RENAMED_KEYS` {old: new}) under their new names, so configs
    written by earlier versions load."""
    renamed = getattr(cls, "RENAMED_KEYS", {})
    if not any(old in data for old in renamed):
        return data
    out = dict(data)
    for old, new in renamed.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def _with_sibling_kind(spec: Any, data: dict, value: Any, fields: dict, key: str) -> Any:
    """`value` with its `kind` set from the sibling key named by the field's `kind_from` metadata."""
    if "kind_from" not in spec.metadata or not isinstance(value, dict):
        return value
    sibling, kinds = spec.metadata["kind_from"]
    chosen = data.get(sibling, fields[sibling].default)
    if chosen not in kinds:
        return value  # the sibling's own check names the bad value
    kind = kinds[chosen]
    if value.get("kind", kind) != kind:
        raise ConfigError(f"{key}.kind: {value['kind']!r} does not match {sibling} {chosen!r}; expected {kind!r}")
    return {**value, "kind": kind}


def discriminated_defaults(cls: type, data: dict) -> dict[str, Any]:
    """{field: default mapping} for the `kind_from` fields of `cls` whose sibling in `data` picks another schema
    than the default one (so a default EDM section is not merged into a user's DDPM section)."""
    out = {}
    for spec in dataclasses.fields(cls):
        if "kind_from" not in spec.metadata:
            continue
        sibling, kinds = spec.metadata["kind_from"]
        kind = kinds.get(data.get(sibling))
        schema = {_kind_of(a): a for a in typing.get_args(typing.get_type_hints(cls)[spec.name])}.get(kind)
        if schema is not None:
            out[spec.name] = dataclasses.asdict(schema())
    return out


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
        return to_dataclass(tp, value, key)
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
        schemas = {kind: a for a in options for kind in _kinds_of(a)}
        kind = value.get("kind") if isinstance(value, dict) else None
        if kind not in schemas:
            raise ConfigError(f"{key}.kind: {kind!r} is not one of {', '.join(schemas)}")
        return to_dataclass(schemas[kind], value, key)
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
    return _kinds_of(schema)[0]


def _kinds_of(schema: type) -> tuple[str, ...]:
    """Every value a schema's `kind: Literal[...]` admits (a text-encoder schema serves clip, openclip, ...)."""
    return typing.get_args(typing.get_type_hints(schema)["kind"])


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


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
