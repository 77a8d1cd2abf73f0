"""Typed settings from YAML: values converted to the dataclass fields' annotations (literals, lists, unions,
nested dataclasses), dotted `key.sub=value` overrides, and mistakes reported as one `ConfigError` line naming the key,
with a close-match suggestion for typos. `goca_fast.config` declares the settings; this module knows no setting."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Literal, Sequence, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported to the user as a single line."""



def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return f"list of {type_name(get_args(tp)[0])}"
    if origin is typing.Union:
        return " or ".join(type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


class RawText(str):
    """An override's text, typed only once the target field is known (so `amp=off` stays the string 'off')."""


def _is_text_type(tp: Any) -> bool:
    if tp is str:
        return True
    return get_origin(tp) is Literal and all(isinstance(c, str) for c in get_args(tp))


def convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML value to the annotated type; raise a one-line ConfigError otherwise."""
    if isinstance(value, RawText):
        if _is_text_type(tp):
            value = str(value)
        else:
            try:
                value = yaml.safe_load(value) if value.strip() else ""
            except yaml.YAMLError:
                value = str(value)
    if isinstance(value, bool) and get_origin(tp) is Literal and "off" in get_args(tp):
        value = "on" if value else "off"  # YAML 1.1 reads a bare `off` as false
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        return build(tp, value, key + ".")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            # YAML reads `1` as int: accept "1" too for int literals and vice versa for str literals.
            for c in choices:
                if str(c) == str(value):
                    return c
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return value
    if origin is typing.Union:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return convert(value, inner, key)
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and item_tp in (int, float):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a {type_name(tp)}, got {value!r}")
        return [convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def suggest(name: str, options: Sequence[str], prefix: str = "") -> str:
    """A close match, named by its full dotted key (a bare 'batch_size' does not say where it goes)."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """An instance of the dataclass `cls` from a (nested) mapping, every value converted to its annotated type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}'{suggest(str(k), names, prefix)}")
        kwargs[k] = convert(v, hints[k], prefix + k)
    return cls(**kwargs)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` over `base`, nested mappings merged key by key."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": RawText(value)}}}."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    value = RawText(raw)
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    return out


def check_key(root: type, key: str) -> None:
    """Catch `data.batchsize=4`-style typos of a dotted key into the dataclass `root`, with the full path in the
    message."""
    cls: Any = root
    prefix = ""
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"config key '{prefix.rstrip('.')}' has no sub-key '{part}'")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise ConfigError(f"unknown config key '{prefix}{part}'{suggest(part, names, prefix)}")
        cls = typing.get_type_hints(cls)[part]
        prefix += part + "."
