"""Typed configs built from plain dicts, with errors that name the key.

`build(cls, data, prefix)` turns a (YAML-loaded) dict into dataclass `cls`,
recursively, checking every key and value type. Unknown keys fail naming
the nearest valid one. Every numeric field declares its range next to its type
and default (`ranged(default, ge=..., gt=..., le=..., lt=...)`); `build` checks
it, so a value outside it (or nan/inf) fails naming the key. The trainer's
recipe loader uses the same function.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A recipe problem; the message is one user-facing line."""


@dataclass(frozen=True)
class Range:
    """The meaningful values of a numeric config key: bounds (None: open) and whether
    inf is allowed (nan never is). Declared next to the field by `ranged`."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = True

    def describe(self) -> str:
        lo = f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}" if self.gt is not None else ""
        hi = f"<= {self.le:g}" if self.le is not None else f"< {self.lt:g}" if self.lt is not None else ""
        return " and ".join(b for b in (lo, hi) if b) or "finite"

    def check(self, value, key: str) -> None:
        if isinstance(value, float) and (math.isnan(value) or (self.finite and math.isinf(value))):
            raise ConfigError(f"{key} must be a finite number ({self.describe()}), got {value}")
        if ((self.ge is not None and not value >= self.ge) or (self.gt is not None and not value > self.gt)
                or (self.le is not None and not value <= self.le) or (self.lt is not None and not value < self.lt)):
            raise ConfigError(f"{key} must be {self.describe()}, got {value}")


_MISSING = dataclasses.MISSING


def ranged(default=_MISSING, *, factory=_MISSING, ge=None, gt=None, le=None, lt=None, finite=True):
    """A dataclass field whose numeric value (or every number of a list value) must lie in a range,
    checked by `build` naming the key: `lr: float = ranged(3e-3, gt=0)`,
    `betas: list[float] = ranged(factory=lambda: [0.9, 0.95], ge=0, lt=1)`. None passes
    (Optional fields keep their "unset" value)."""
    meta = {"range": Range(ge, gt, le, lt, finite)}
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_range(f: dataclasses.Field) -> Range | None:
    return f.metadata.get("range")


def check_range(rng: Range, value, key: str) -> None:
    """`value` (a number, None, or a nested list of numbers) against `rng`."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (list, tuple)):
        try:
            for v in value:
                check_range(rng, v, key)
        except ConfigError:
            raise ConfigError(f"{key} must be {rng.describe()} (every entry), got {value}") from None
    elif isinstance(value, (int, float)):
        rng.check(value, key)


def check_ranges(obj, prefix: str = "") -> None:
    """Every ranged field of dataclass `obj` and of the dataclasses it holds (fields, lists),
    for configs made in code rather than by `build`; ConfigError naming the key."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        rng = field_range(f)
        if rng is not None:
            check_range(rng, value, key)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
        items = value if isinstance(value, (list, tuple)) else [value]
        for i, item in enumerate(items):
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                check_ranges(item, f"{key}[{i}]" if item is not value else key)


def nearest(name: str, choices) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.4)
    return f" (did you mean {match[0]!r}?)" if match else f" (valid: {', '.join(sorted(choices))})"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(tp, value, key: str):
    """Check `value` against type `tp` (int, float, str, bool, Optional, Literal,
    list[...], dict[str, ...], dataclass); returns the converted value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) > 1 else Any
        return {str(k): coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
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
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def build(cls, data: dict | None, prefix: str = ""):
    """Instantiate dataclass `cls` from `data`, validating keys and types."""
    data = data or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"unknown key {path!r}{nearest(str(key), fields)}")
        kwargs[key] = coerce(hints[key], value, path)
        rng = field_range(fields[key])
        if rng is not None:
            check_range(rng, kwargs[key], path)
        elif isinstance(kwargs[key], float) and not math.isfinite(kwargs[key]):
            raise ConfigError(f"{path} must be a finite number, got {kwargs[key]}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def to_dict(obj) -> Any:
    """Dataclass (nested) -> plain dict, for saving the resolved recipe."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
