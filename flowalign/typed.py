"""Dataclasses from YAML mappings: keys, types and bounds checked, each mistake one line naming the field.

Every field is a dataclass field with a type hint; ``bounded(...)`` adds ``min`` / ``max`` bounds or
``must_exist`` (a path) and a one-line ``doc``. Numbers must be finite (NaN and infinities are rejected);
integers without a ``max`` stay below 2**31.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Literal

from .errors import FlowalignError


class ConfigError(FlowalignError):
    """A config value, key or file is wrong; the message names it."""


def bounded(default, *, min=None, max=None, must_exist: bool = False, doc: str = ""):  # noqa: A002
    """A dataclass field with validation metadata."""
    factory = isinstance(default, (list, dict))
    kw = {"default_factory": (lambda: type(default)(default))} if factory else {"default": default}
    return field(metadata={"min": min, "max": max, "must_exist": must_exist, "doc": doc}, **kw)


def from_dict(cls: type, data: dict, where: str = "config", prefix: str = ""):
    """Build dataclass ``cls`` from ``data``, checking keys, types and bounds."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'top level'}: expected a section (mapping), got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # init=False: set by code, not by files
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{where}: unknown key '{prefix}{unknown[0]}' (allowed in "
                          f"{prefix.rstrip('.') or 'top level'}: {', '.join(fields)})")
    values = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            values[name] = from_dict(typ, value, where, key + ".")
        else:
            values[name] = _check(_convert(value, typ, where, key), fields[name].metadata, where, key)
    return cls(**values)


def _describe(typ) -> str:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(typ, str(typ))


def _convert(value, typ, where: str, key: str):
    """``value`` as ``typ``, or a ConfigError naming ``key`` and the expected type."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    fail = ConfigError(f"{where}: {key}: expected {_describe(typ)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where, key)
            except ConfigError:
                pass
        raise fail
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads an unquoted `no` as false
            return "no"
        if value in args and not (isinstance(value, bool) and True not in args):
            return value
        raise fail
    if origin is list:
        if isinstance(value, str) and args[0] is str:  # a comma-separated override: a,b,c
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise fail
        return [_convert(v, args[0], where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail
        return {_convert(k, args[0], where, key): _convert(v, args[1], where, f"{key}.{k}") for k, v in value.items()}
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise fail
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail
    if typ is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML 1.1 reads 1e-4 as a string
            except ValueError:
                pass
        if number is None:
            raise fail
        if not math.isfinite(number):
            raise ConfigError(f"{where}: {key}: expected a finite number, got {value!r}")
        return number
    if typ is str:
        if isinstance(value, str):
            return value
        raise fail
    return value


#: Integers without a bound of their own stay within int32 (what counts, sizes and torch's indexing expect).
INT_LIMIT = 2 ** 31 - 1


def _check(value, meta, where: str, key: str):
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, int) and not isinstance(value, bool) and hi is None and value > INT_LIMIT:
        raise ConfigError(f"{where}: {key}: {value} is out of range (allowed: <= {INT_LIMIT})")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            allowed = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
            raise ConfigError(f"{where}: {key}: {value} is out of range (allowed: {allowed})")
    if meta.get("must_exist") and value is not None and not _exists(value):
        raise ConfigError(f"{where}: {key}: file '{value}' not found")
    return value


def _exists(path: str) -> bool:
    """Whether a path exists; a name the system cannot even look up (too long, a NUL byte) does not."""
    try:
        return Path(path).exists()
    except (OSError, ValueError):
        return False
