"""Typed YAML: build frozen dataclasses from plain data, checking keys and types against annotations."""

from __future__ import annotations

import collections.abc
import dataclasses
import typing
from typing import Any, Mapping

from pipeline.errors import ConfigError, PipelineError

_NO_VALUE = object()


def fail(path: str, value: Any, allowed: str) -> ConfigError:
    """The error for ``value`` at key ``path``, saying what is allowed."""
    return ConfigError(f"{path}: got {value!r}; {allowed}")


def rekey(err: PipelineError, path: str, value: Any = _NO_VALUE) -> ConfigError:
    """A library's error re-raised under the YAML key ``path`` (the library spoke in its argument names).

    An error made by :func:`pipeline.errors.invalid` or :func:`pipeline.errors.check_count` keeps its value and
    reason: ``"<path>: got <value>; <reason>"``. Any other error keeps its message: ``"<path>: got <value>;
    <message>"`` when ``value`` is given, else ``"<path>: <message>"``.
    """
    if getattr(err, "reason", None) is not None:
        return fail(path, err.value, err.reason)
    if value is not _NO_VALUE:
        return fail(path, value, str(err))
    return ConfigError(f"{path}: {err}")


def plain(value: Any) -> Any:
    """Tuples and mappings of a dataclass dump as plain lists and dicts."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) if a is not type(None) else "null" for a in typing.get_args(tp))
    if origin is tuple:
        inner = _type_name(typing.get_args(tp)[0]).removeprefix("an ").removeprefix("a ")
        return f"a list of {inner}s"
    if origin in (Mapping, dict, collections.abc.Mapping) or tp in (Mapping, dict):
        return "a mapping"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Checks ``value`` against the type annotation ``tp``; returns it converted (lists -> tuples)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError:
                continue
        raise fail(path, value, f"expected {_type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail(path, value, f"expected {_type_name(tp)}")
        inner = typing.get_args(tp)[0]
        return tuple(_convert(inner, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict, collections.abc.Mapping) or tp in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise fail(path, value, "expected a mapping of keyword arguments")
        return dict(value)
    if tp in _SCALARS:
        kinds, message = _SCALARS[tp]
        if not isinstance(value, kinds) or (tp is not bool and isinstance(value, bool)):
            raise fail(path, value, message)
        return float(value) if tp is float else value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")


_SCALARS: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "expected true or false"),
    int: ((int,), "expected an integer"),
    float: ((int, float), "expected a number"),
    str: ((str,), "expected a string"),
}
"""Scalar annotation -> (accepted Python types, error text); bools are not numbers here."""


def build(cls: type, raw: Any, path: str) -> Any:
    """Builds dataclass ``cls`` from a mapping, checking every key and type; errors name the key path."""
    if not isinstance(raw, Mapping):
        raise fail(path or "<top level>", raw, f"expected a mapping with keys {keys(cls)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(f"{sub}: unknown key (value {value!r}); allowed keys here: {', '.join(names)}")
        kwargs[key] = _convert(hints[key], value, sub)
    return cls(**kwargs)


def keys(cls: type) -> str:
    """The field names of dataclass ``cls``, comma-separated."""
    return ", ".join(f.name for f in dataclasses.fields(cls))
