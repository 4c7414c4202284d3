"""G²RPO, Granular GRPO (arXiv 2510.01982): one SDE step per branch, judged at several strides.

An ODE trunk per prompt; at each of ``sde_steps`` (default the first half) ``group_size`` branches take one
SDE step, then each branch is finished by ODE at every stride λ of ``strides`` (every λ-th σ of the rest
of the grid). Leaves of one (prompt, step, stride) form a group; a branch's one SDE transition gets the
sum of its leaves' advantages over the strides (multi-granularity integration).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..algorithms.grpo.advantages import transition_advantages
from ..samplers.rollout import Node, Rollout
from ..samplers.structures import singular
from ..typed import bounded
from . import register_method
from .base import require
from .policy_gradient import PolicyGradientMethod, PolicyGradientOptions


@dataclass
class G2RPOOptions(PolicyGradientOptions):
    group_size: int = bounded(12, min=2, doc="branches per SDE step (G)")
    sde_steps: list[int] = bounded([], doc="steps taking the single SDE step (empty: the first half)")
    strides: list[int] = bounded([1, 2, 3], doc="ODE strides each branch is finished at")
    std: Literal["global", "group"] = "group"


@register_method
class G2RPO(PolicyGradientMethod):
    name = "g2rpo"
    title = "G²RPO"
    paper = "arXiv 2510.01982"
    Options = G2RPOOptions
    shares_trunks = True
    whole_prompts = "a prompt's branches share one ODE trunk"

    @classmethod
    def check(cls, options, train, modifiers) -> None:
        bad = [s for s in options.sde_steps if not 0 <= s < train.steps]
        require(not bad, f"g2rpo.sde_steps: {bad[0] if bad else ''} is not a step in [0, {train.steps - 1}] "
                f"(train.steps={train.steps})")
        require(bool(options.strides) and min(options.strides) >= 1, "g2rpo.strides: expected integers >= 1")

    @property
    def samples_per_prompt(self) -> int:
        return self.options.group_size * len(self._sde_steps()) * len(self.options.strides)

    def _sde_steps(self) -> list[int]:
        return self.options.sde_steps or list(range(self.train.steps // 2))

    def plan(self, sigmas: torch.Tensor, iteration: int, select: list[int] | None) -> tuple[list[Node], torch.Tensor]:
        return singular(sigmas, self.train.prompts_per_iteration, self._sde_steps(), group_size=self.options.group_size,
                        strides=tuple(self.options.strides))

    def credit(self, rollout: Rollout, leaf_advantages: torch.Tensor, leaf_rewards: torch.Tensor) -> torch.Tensor:
        return transition_advantages(leaf_advantages, rollout.transition_leaves, "sum")
