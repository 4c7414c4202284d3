"""Flow-GRPO-Fast (Flow-GRPO's ``train_sd3_fast.py``): SDE only inside a random window of 2-3 steps.

Each iteration draws the window start uniformly in ``[window_low, window_high - window_size]`` (``window_low``
default 0, ``window_high`` default ``steps // 2``); the window's steps are stochastic and trained, the rest is
ODE, so an iteration trains ``window_size`` steps. Its authors recommend a small clip range (1e-5).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..methods import register_modifier
from ..methods.base import Modifier, require
from ..samplers.windows import WindowSchedule
from ..typed import bounded


@dataclass
class FastOptions:
    window_size: int = bounded(2, min=1, doc="SDE steps in the window")
    window_high: int | None = bounded(None, min=1, doc="the window lies below this step (default steps // 2)")
    window_low: int = bounded(0, min=0, doc="the window starts at or after this step (Flow-Factory's lowest SDE "
                              "step is 1)")


@register_modifier
class Fast(Modifier):
    name = "fast"
    title = "Flow-GRPO-Fast window"
    Options = FastOptions
    combines_with = frozenset({"flow_grpo"})

    @classmethod
    def check(cls, options, method, method_options, train, modifiers) -> None:
        high = options.window_high or train.steps // 2
        require(options.window_size <= min(high, train.steps), f"modifiers.fast.window_size: {options.window_size} "
                f"does not fit below step {high} (train.steps={train.steps})")
        require(options.window_low + options.window_size <= high, f"modifiers.fast: window_low "
                f"{options.window_low} + window_size {options.window_size} does not fit below step {high}")

    def window(self, steps: int, seed: int) -> WindowSchedule:
        o = self.options
        return WindowSchedule("random", size=o.window_size, high=o.window_high or steps // 2, low=o.window_low,
                              seed=seed)
