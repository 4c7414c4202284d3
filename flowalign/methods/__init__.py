"""Training methods, one file each, and the modifiers that combine with them, found by name.

Every module of this package and of ``flowalign.modifiers`` registers what it defines with
``@register_method`` / ``@register_modifier``; other packages add theirs through the ``flowalign.methods``
entry point group (a module to import). Adding a method is adding a file: nothing else names it.
"""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Any

from ..typed import ConfigError, from_dict
from .base import Method, Modifier

_METHODS: dict[str, type[Method]] = {}
_MODIFIERS: dict[str, type[Modifier]] = {}
_loaded = False
ENTRY_POINT_GROUP = "flowalign.methods"


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` selectable as ``method: <cls.name>``."""
    _METHODS[cls.name] = cls
    return cls


def register_modifier(cls: type[Modifier]) -> type[Modifier]:
    """Class decorator: make ``cls`` selectable under ``modifiers: {<cls.name>: {...}}``."""
    _MODIFIERS[cls.name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from .. import modifiers as modifier_package

    for package in (__name__, modifier_package.__name__):
        path = importlib.import_module(package).__path__
        for info in pkgutil.iter_modules(path):
            if info.name != "base":
                importlib.import_module(f"{package}.{info.name}")
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        importlib.import_module(entry.value.split(":")[0])


def methods() -> dict[str, type[Method]]:
    """Every registered method by name."""
    _load_all()
    return dict(sorted(_METHODS.items()))


def modifiers() -> dict[str, type[Modifier]]:
    """Every registered modifier by name."""
    _load_all()
    return dict(sorted(_MODIFIERS.items()))


def get_method(name: str) -> type[Method]:
    known = methods()
    if name not in known:
        raise ConfigError(f"method: unknown method '{name}' (available: {', '.join(known)})")
    return known[name]


def parse_method_sections(data: dict, where: str) -> tuple[str, Any, dict[str, Any]]:
    """Take the method's section and ``modifiers`` out of a run's raw mapping and type them: returns the
    method's name, its options and each enabled modifier's options. A section for another method, an
    unknown modifier or one that does not combine with the method is a one-line error."""
    name = data.get("method", "flow_grpo")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: method: expected a method name, got {name!r}")
    try:
        cls = get_method(name)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    for other in methods():
        if other != name and other in data and data[other] is None:  # `flow_grpo=null`: dropped
            del data[other]
        elif other != name and other in data:
            raise ConfigError(f"{where}: section '{other}' holds options of method {other}, but the run's method is "
                              f"{name} (move them under '{name}:' or set method: {other})")
    section = data.pop(name, None)
    options = from_dict(cls.Options, {} if section is None else section, where, f"{name}.")
    return name, options, _parse_modifiers(data.pop("modifiers", None), name, where)


def _parse_modifiers(raw: Any, method: str, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: modifiers: expected a mapping of modifier name to its options, got {raw!r}")
    known = modifiers()
    parsed = {}
    for name, section in raw.items():
        if name not in known:
            raise ConfigError(f"{where}: modifiers: unknown modifier '{name}' (available: {', '.join(known)})")
        if section is None or section is False:  # `modifiers.kl=null`: switched off
            continue
        cls = known[name]
        if not combines(cls, get_method(method)):
            raise ConfigError(f"{where}: modifiers.{name} ({cls.title}) does not combine with method {method} "
                              f"(it combines with: {', '.join(sorted(cls.combines_with))})")
        parsed[name] = from_dict(cls.Options, {} if section is True else section, where, f"modifiers.{name}.")
    return parsed


def combines(modifier: type[Modifier], method: type[Method]) -> bool:
    """Whether ``modifier`` declares ``method`` (by name, or by its trainer family) among those it combines with."""
    return method.name in modifier.combines_with or method.family in modifier.combines_with


def build(name: str, options: Any, train, modifier_options: dict[str, Any]) -> Method:
    """The method object with its modifiers attached (the trainer's view of a run's method)."""
    method = get_method(name)(options, train)
    known = modifiers()
    method.modifiers = {m: known[m](opts, method) for m, opts in modifier_options.items()}
    return method


__all__ = ["Method", "Modifier", "build", "combines", "get_method", "methods", "modifiers", "parse_method_sections",
           "register_method", "register_modifier"]
