"""Generic validation of nested frozen dataclasses from YAML data, with errors that name the key path."""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from typing import Any, Literal, Mapping


def check(ok: bool, key: str, message: str) -> None:
    """Raise a key-relative problem, turned into a path-qualified ConfigError by the parser."""
    if not ok:
        raise FieldProblem(key, message)


class FieldProblem(Exception):
    """A value that fails validation; `key` is relative until the parser prefixes it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return "a list"
    if origin in (Mapping, dict, collections.abc.Mapping):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def convert(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return the frozen representation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors: list[FieldProblem] = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, key)
            except FieldProblem as exc:
                errors.append(exc)
        raise FieldProblem(key, f"must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise FieldProblem(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin in (Mapping, dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise FieldProblem(key, f"must be a mapping, got {value!r}")
        key_tp, val_tp = args
        out = {}
        for k, v in value.items():
            out[convert(key_tp, k, f"{key}.{k}")] = convert(val_tp, v, f"{key}.{k}")
        return types.MappingProxyType(out)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise FieldProblem(key, f"must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise FieldProblem(key, f"must be a list of {len(args)} values, got {value!r}")
        return tuple(convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is float and isinstance(value, str):  # YAML reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in _SCALARS:
        accepts, what = _SCALARS[tp]
        if not accepts(value):
            raise FieldProblem(key, f"must be {what}, got {value!r}")
        return tp(value)
    raise TypeError(f"unsupported annotation {tp!r} at {key}")


# Scalar annotations: which YAML values each accepts (bool is an int in Python, never a number here), and its name.
_SCALARS: dict[type, tuple[Any, str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FieldProblem(prefix, f"must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise FieldProblem(where, f"unknown key (known keys: {', '.join(fields)})")
    kwargs = {}
    for name in fields:
        if name in raw:
            kwargs[name] = convert(hints[name], raw[name], f"{prefix}.{name}" if prefix else name)
    try:
        return cls(**kwargs)
    except FieldProblem as exc:
        key = f"{prefix}.{exc.key}" if prefix else exc.key
        raise FieldProblem(key, exc.message) from None
