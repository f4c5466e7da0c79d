"""Strict conversion between plain data (YAML, JSON, ``--set`` overrides) and typed dataclasses.

Every error names the offending key by its dotted path and says what is allowed, e.g.
``model.num_layrs: unknown key; allowed: num_layers, hidden_size, ...`` or
``train.steps: expected int, got 'ten'``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lucid_megatron.errors import ConfigError  # noqa: F401  (re-exported: the config package's error)


# A config is a few hundred values; a YAML "billion laughs" (aliases of aliases) expands to billions.
MAX_CONFIG_VALUES = 100_000


def _short(value, limit: int = 120) -> str:
    """``repr(value)``, cut to ``limit`` characters (a hostile value must not flood the terminal)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _count_values(data, budget: int) -> int:
    """Values in ``data`` with shared (aliased) parts counted each time they appear; stops past ``budget``."""
    stack, count = [data], 0
    while stack and count <= budget:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return count


def parse_yaml(text: str, origin: str):
    """Safe YAML (no Python tags) that expands to at most MAX_CONFIG_VALUES values; errors name ``origin``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{origin}: invalid YAML{where}: {_short(problem, 200)}") from None
    if _count_values(data, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
        raise ConfigError(f"{origin}: expands to more than {MAX_CONFIG_VALUES} values (YAML aliases of aliases?)")
    return data


def read_yaml_file(path: str | Path):
    """A YAML config file, with a clear error for a missing path, a directory, or bytes that are not UTF-8."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; give a YAML file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})"
        ) from None
    return parse_yaml(text, f"config file {str(path)!r}")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"list[{_type_name(item)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(tp, value, path: str):
    """Convert ``value`` to type ``tp`` or raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        bool_mismatch = isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed)
        if bool_mismatch or value not in allowed:
            raise ConfigError(f"{path}: {_short(value)} is not allowed; allowed: {', '.join(map(repr, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        if value is not None and len(options) == 1:  # Optional[X]: X's own error says what is wrong
            return _convert(options[0], value, path)
        errors = []
        for option in typing.get_args(tp):
            try:
                return _convert(option, value, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_short(value)}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{path}: expected null, got {_short(value)}")
        return None
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_short(value)}")
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_short(value)}")
        return {_convert(key_tp, k, path): _convert(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected bool (true/false), got {_short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {_short(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected float, got {_short(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected str, got {_short(value)}")
        return value
    raise TypeError(f"{path}: unsupported field type {tp!r} in the schema")


def from_dict(cls, data, path: str = ""):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    where = path or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {_short(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"{path + '.' if path else ''}{str(key)[:60]}: unknown key; allowed: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{path + '.' if path else ''}{name}")
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s): {', '.join(missing)}")
    prefix = f"{path}: " if path else ""
    try:
        obj = cls(**kwargs)  # dataclasses may validate in __post_init__ (ValueError)
        validate = getattr(obj, "validate", None)
        if validate is not None:
            validate()
    except ConfigError as err:
        raise ConfigError(f"{path + '.' if path else ''}{err}") from None
    except ValueError as err:
        raise ConfigError(f"{prefix}{err}") from None
    return obj


def load_spec_file(path: str | Path, cls, what: str):
    """A YAML file read into dataclass ``cls`` (``from_dict``); errors name the file (``what``: what it is)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        return from_dict(cls, parse_yaml(path.read_text(), str(path)) or {})
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def to_dict(obj) -> dict:
    """The inverse of :func:`from_dict` (plain, YAML-serialisable data)."""
    return dataclasses.asdict(obj)
