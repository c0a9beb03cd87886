"""Stage configs: YAML into typed dataclasses, overridable with `--set a.b=v`.

Values are coerced to the annotated field type, unknown keys are refused by their dotted name,
and each dataclass validates itself in __post_init__ (ConfigError, from pipelines.errors, names the key).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

import fsspec
import yaml

from .errors import ConfigError

T = TypeVar("T")


def load_yaml(url: str) -> dict:
    try:
        with fsspec.open(url, "r") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{url}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{url}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{url}: top level must be a mapping of sections")
    return data


def parse_overrides(overrides: typing.Iterable[str]) -> dict:
    """['model.code_dim=32', 'optim.lr=1e-3'] -> nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. model.codebook_size=1024")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is a value, not a section")
        node[parts[-1]] = value
    return tree


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def build(cls: type[T], data: dict | None, prefix: str = "") -> T:
    """Build dataclass `cls` from nested dicts, coercing values to annotated types."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key {_join(prefix, unknown[0])} "
                          f"(known in {prefix or 'top level'}: {', '.join(sorted(known))})")
    kwargs = {name: _coerce(hints[name], value, _join(prefix, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def load_config(cls: type[T], url: str | None = None, overrides: typing.Iterable[str] = ()) -> T:
    data = load_yaml(url) if url else {}
    return build(cls, merge(data, parse_overrides(overrides)))


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp):
        return value if dataclasses.is_dataclass(value) else build(tp, value, key)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r} must be a list")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(item_tp, v, key) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key} = {value!r} must be true or false")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} must be a number")
        try:
            number = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} = {value!r} must be {'an integer' if tp is int else 'a number'}") from None
        if tp is int and isinstance(value, float):   # 512.0 too, as the model config refuses it
            raise ConfigError(f"{key} = {value!r} must be an integer")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key} = {value!r} must be a string")
        return str(value)
    return value
