"""``flowalign optimize``'s config: the same sectioned YAML and ``key=value`` overrides as ``train``.

    method: reno                    # reno | carinox | best-of-n
    model: {name: stabilityai/sd-turbo, dtype: float16}
    reward: {weights: {hpsv2.1: 5.0, imagereward: 1.0}}
    prompts: ["a red bicycle"]      # and/or prompt_file
    reno: {steps: 1, iterations: 50, lr: 5.0}

The chosen method's options sit under its own key (``reno``, ``carinox``, ``best_of_n``); a section for another
method is an error, not silently ignored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .algorithms.reno import ReNOConfig
from .config import ModelConfig, apply_overrides, read_yaml
from .typed import ConfigError, bounded, from_dict

SECTIONS = {"reno": "reno", "carinox": "carinox", "best-of-n": "best_of_n"}


@dataclass
class CARINOXOptions(ReNOConfig):
    """ReNO's options plus CARINOX's exploration over seeds."""

    k: int = bounded(3, min=1, max=64, doc="seeds explored")
    top: int | None = bounded(None, min=1, doc="optimise only the best `top` of the k seeds (default all)")
    matched_iterations: int = bounded(30, min=1, doc="the compute-matched selection's iteration budget")
    categories: str | None = bounded(None, must_exist=True, doc="a JSON file: prompt -> category, or [[category, "
                                     "p], ...] (CARINOX's category_guess.json); multipliers from its table")


@dataclass
class BestOfNOptions:
    n: int | None = bounded(50, min=1, max=100_000, doc="samples per prompt")
    nfe_budget: int | None = bounded(None, min=1, doc="instead of n: as many samples as this many NFEs allow")
    steps: int | None = bounded(None, min=1, max=1000)
    guidance: float | None = bounded(None, min=0.0, max=100.0)
    negative_prompt: str = ""
    batch_size: int = bounded(64, min=1)
    keep_images: bool = True


@dataclass
class OptimizeReward:
    weights: dict[str, float] = bounded({"toy/bold_digit": 1.0}, doc="reward name -> weight")
    options: dict[str, dict] = bounded({}, doc="reward name -> constructor arguments (path, ...)")


@dataclass
class OptimizeConfig:
    method: Literal["reno", "carinox", "best-of-n"] = "reno"
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: OptimizeReward = field(default_factory=OptimizeReward)
    prompts: list[str] = bounded([], doc="the prompts (one image each)")
    prompt_file: str | None = bounded(None, must_exist=True, doc="one prompt per line")
    seed: int = bounded(0, min=0, max=2 ** 62)
    out: str = bounded("outputs/optimize", doc="folder for best.png, iterations/, rewards.csv, rewards.png")
    reno: ReNOConfig = field(default_factory=ReNOConfig)
    carinox: CARINOXOptions = field(default_factory=CARINOXOptions)
    best_of_n: BestOfNOptions = field(default_factory=BestOfNOptions)

    def method_options(self) -> dict[str, Any]:
        """The chosen method's options as ``flowalign.optimize`` keywords."""
        options = dataclasses.asdict(getattr(self, SECTIONS[self.method]))
        path = options.pop("categories", None)
        if path:  # CARINOX's category-aware weights: a prompt's category picks a row of its table
            from .files import read_json

            guesses = read_json(path, "carinox.categories")
            options["categorize"] = guesses.get  # a prompt the file does not name: multipliers 1
        return options

    def all_prompts(self) -> list[str]:
        prompts = list(self.prompts)
        if self.prompt_file:
            from .prompt_sets import read_prompt_set

            prompts += read_prompt_set(self.prompt_file, "prompt_file").prompts
        return prompts


def load_optimize_config(path: str | Path | None = None, overrides: list[str] = ()) -> OptimizeConfig:
    """Read, override and check an optimize config (before any model loads)."""
    data = read_yaml(path) if path is not None else {}
    where = str(path) if path is not None else "config"
    apply_overrides(data, list(overrides))
    method = data.get("method", "reno")
    if not isinstance(method, str) or method not in SECTIONS:
        raise ConfigError(f"{where}: method: expected one of {', '.join(repr(m) for m in SECTIONS)}, got {method!r}")
    for other, section in SECTIONS.items():
        if other != method and data.get(section) is not None:
            raise ConfigError(f"{where}: section '{section}' holds options of method {other}, but method is "
                              f"{method} (move them under '{SECTIONS.get(method, method)}:' or set method: {other})")
    for section in SECTIONS.values():  # `reno=null`: the section is not given (its defaults stand)
        if section in data and data[section] is None:
            del data[section]
    cfg = from_dict(OptimizeConfig, data, where)
    from .rewards.registry import known

    unknown = [n for n in cfg.reward.weights if not known(n)]
    if not cfg.reward.weights:
        raise ConfigError(f"{where}: reward.weights: expected at least one reward")
    if unknown:
        raise ConfigError(f"{where}: reward.weights: unknown reward '{unknown[0]}' (flowalign rewards list shows them)")
    from .checks import check_reward_options

    try:
        check_reward_options(cfg.reward.options)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return cfg
