"""Every config key with its type, default and meaning, read from the config dataclasses' own metadata
(``flowalign keys [SECTION]``): the run's sections, each method's section and each modifier's."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from .config import EvalConfig, ModelConfig, MonitorConfig, RewardConfig, RunConfig, SampleConfig, TrainConfig
from .typed import ConfigError

RUN_SECTIONS = {"model": ModelConfig, "sample": SampleConfig, "eval": EvalConfig, "reward": RewardConfig,
                "train": TrainConfig, "monitor": MonitorConfig}


def sections() -> dict[str, type]:
    """Section name -> its dataclass: the run's, then ``<method>`` and ``modifiers.<name>`` for every one."""
    from .methods import methods, modifiers

    return {**RUN_SECTIONS, **{name: cls.Options for name, cls in methods().items()},
            **{f"modifiers.{name}": cls.Options for name, cls in modifiers().items()}}


def describe_type(hint: Any) -> str:
    """``Literal['a', 'b']`` -> ``a | b``; ``int | None`` -> ``int or null``; classes by name."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        named = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if origin is not None:
        return f"{origin.__name__}[{', '.join(describe_type(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint))


def meaning(cls: type, name: str) -> str:
    """The field's ``doc``, or that of the same field in the nearest base class that gives one."""
    for klass in cls.__mro__:
        found = {f.name: f for f in dataclasses.fields(klass)} if dataclasses.is_dataclass(klass) else {}
        if name in found and found[name].metadata.get("doc"):
            return found[name].metadata["doc"]
    return ""


def default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def rows(section: str) -> list[tuple[str, str, str, str]]:
    """``(key, type, default, meaning)`` for every key of ``section`` (top level: ``""``)."""
    known = sections()
    if section and section not in known:
        raise ConfigError(f"keys: unknown section '{section}' (sections: {', '.join(known)})")
    cls = known[section] if section else RunConfig
    hints = typing.get_type_hints(cls)
    prefix = f"{section}." if section else ""
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or dataclasses.is_dataclass(hints[f.name]):
            continue
        out.append((prefix + f.name, describe_type(hints[f.name]), repr_default(default(f)), meaning(cls, f.name)))
    return out


def repr_default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def table(section: str | None) -> str:
    """``key = default  [type]`` and its meaning on the next line, for one section or every one."""
    names = [section] if section else ["", *sections()]
    return "\n".join(f"{key} = {value}  [{kind}]\n    {text}"
                     for name in names for key, kind, value, text in rows(name))
