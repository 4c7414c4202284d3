"""TempFlow-GRPO (arXiv 2508.04324): branch off an ODE trunk, one group per branching step.

An ODE trunk per prompt; at each of ``branch_steps`` (default all but the last) ``group_size`` SDE branches
leave the trunk state, each finished by ODE and scored, so a branch's reward credits exactly one SDE step
("process reward"); advantages are normalised per (prompt, step) group. The loss weighs each step by
``noise_weight · std`` (2.25·g·sqrt(|Δσ|)): early, noisier steps count more.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..samplers.rollout import Node
from ..samplers.structures import branches
from ..typed import bounded
from . import register_method
from .base import require
from .policy_gradient import PolicyGradientMethod, PolicyGradientOptions


@dataclass
class TempFlowGRPOOptions(PolicyGradientOptions):
    group_size: int = bounded(6, min=2, doc="SDE branches per branching step (one group each)")
    branch_steps: list[int] = bounded([], doc="steps that branch (empty: all but the last)")
    noise_weight: float = bounded(2.25, min=0.0, doc="loss weight c*std per step (0: off)")
    std: Literal["global", "group"] = "group"


@register_method
class TempFlowGRPO(PolicyGradientMethod):
    name = "tempflow_grpo"
    title = "TempFlow-GRPO"
    paper = "arXiv 2508.04324"
    Options = TempFlowGRPOOptions
    shares_trunks = True
    whole_prompts = "a prompt's branches share one ODE trunk"

    @classmethod
    def check(cls, options, train, modifiers) -> None:
        bad = [s for s in options.branch_steps if not 0 <= s < train.steps - 1]
        require(not bad, f"tempflow_grpo.branch_steps: {bad[0] if bad else ''} is not a step in [0, "
                f"{train.steps - 2}] (train.steps={train.steps}; the last step cannot branch)")

    @property
    def samples_per_prompt(self) -> int:
        return self.options.group_size * len(self._branch_steps())

    def _branch_steps(self) -> list[int]:
        return self.options.branch_steps or list(range(self.train.steps - 1))

    def plan(self, sigmas: torch.Tensor, iteration: int, select: list[int] | None) -> tuple[list[Node], torch.Tensor]:
        return branches(sigmas, self.train.prompts_per_iteration, self._branch_steps(),
                        num_branches=self.options.group_size)

    def step_weights(self, std: torch.Tensor) -> torch.Tensor | None:
        return self.options.noise_weight * std if self.options.noise_weight else None
