"""Typed configs loaded from YAML with errors that name the bad key.

Every step (quantize recipe, node params, drift thresholds, training) has one dataclass config.
``load_config(Cls, path_or_dict)`` uses ``yaml.safe_load`` and rejects unknown keys, wrong types
and (via the dataclass's ``__post_init__``) bad values, always naming the offending key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or dict is invalid; the message names the key and the problem."""


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            if arg is type(None) and value is None:
                return None
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} does not match {annotation}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item_type = args[0] if args else Any
        items = [_check_type(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        val_type = args[1] if len(args) == 2 else Any
        return {k: _check_type(f"{key}.{k}", v, val_type) for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}"
            f" (valid keys: {', '.join(sorted(fields))})"
        )
    kwargs = {name: _check_type(f"{prefix}{name}", value, hints[name]) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from err


def read_yaml(path: str | Path) -> Any:
    """``yaml.safe_load`` of a file; a missing file or invalid YAML raises ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err


def load_config(cls: type[T], source: str | Path | dict[str, Any] | None, section: str | None = None) -> T:
    """Load ``cls`` from a YAML file path, a dict, or None (defaults).

    Args:
        cls: the config dataclass.
        source: YAML path, already-parsed mapping, or None.
        section: optional top-level key holding the config inside the file.
    """
    if source is None:
        return cls()
    data = read_yaml(source) if isinstance(source, (str, Path)) else source
    if section is not None:
        if not isinstance(data, dict) or section not in data:
            raise ConfigError(f"missing top-level key {section!r}")
        data = data[section] or {}
    return from_dict(cls, data)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-dict form of a config dataclass (for manifests and reports)."""
    return dataclasses.asdict(config)
