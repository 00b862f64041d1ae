"""From YAML values to a typed recipe: each value checked against its field's annotation (YAML is looser than
Python: `1e-4` is a string, a bare `off` a boolean), nested dataclasses built from nested mappings, and unknown
keys named with the nearest valid one."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal


class RecipeError(ValueError):
    """A recipe key is unknown, has the wrong type or an invalid value."""


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each field of a dataclass."""
    return typing.get_type_hints(cls)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is looser than Python (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool) and ("off" if not value else "on") in args:
            value = "off" if not value else "on"  # YAML 1.1 reads a bare `off` / `on` as a boolean
        if value not in args:
            raise RecipeError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML reads .inf / .nan: an infinite lr turns every weight NaN at step 1
            raise RecipeError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported recipe type {tp} for {key}")


def _type_name(tp: Any) -> str:
    """What a value of `tp` may be, in words: `number or 'auto'` for `float | Literal["auto"]`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin is Literal:
        return " or ".join(map(repr, args))
    return {float: "number", int: "integer", bool: "true/false", str: "string"}.get(tp) or getattr(
        tp, "__name__", str(tp).replace("typing.", "")
    )


def unknown_key(key: str, valid: list[str]) -> RecipeError:
    """The error for an unknown key, naming the nearest valid one."""
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], [v.rsplit(".", 1)[-1] for v in valid], n=1)
    close_full = [v for v in valid if close and v.rsplit(".", 1)[-1] == close[0]]
    hint = f"; did you mean `{close_full[0]}`?" if close_full else ""
    return RecipeError(f"unknown recipe key `{key}`{hint} (valid keys: {', '.join(valid)})")


def build_dataclass(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """The dataclass `cls` from nested dicts, every value coerced to its field's type (`prefix`: the dotted key so far)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {data!r}")
    hints = field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise unknown_key(prefix + str(key), [prefix + n for n in names])
        tp = hints[key]
        if dataclasses.is_dataclass(tp):  # (`model:` with nothing after it is null: the defaults)
            kwargs[key] = build_dataclass(tp, {} if value is None else value, f"{prefix}{key}.")
        else:
            kwargs[key] = coerce(value, tp, prefix + key)
    return cls(**kwargs)
