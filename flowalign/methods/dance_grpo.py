"""DanceGRPO (arXiv 2505.07818): GRPO with a constant-g SDE and a random subset of steps.

``g = η`` (η 0.3); every step is SDE; the last step is never trained and a random
``int((T-1)·timestep_fraction)`` of the others (0.6) is trained per trajectory; advantages are z-scores
within each group with the unbiased std and eps 1e-8; one initial noise per group (``share_noise``).
Combines with CPS noise, GRPO-Guard, KL and LayerTuning-RL; not with the Fast window (which would replace
the random subset).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..samplers.rollout import Node
from ..typed import bounded
from . import register_method
from .policy_gradient import PolicyGradientMethod, PolicyGradientOptions, independent_plan


@dataclass
class DanceGRPOOptions(PolicyGradientOptions):
    group_size: int = bounded(12, min=2, doc="trajectories per prompt (G)")
    noise: Literal["flow_grpo", "dance", "ddim"] = "dance"
    noise_level: float = bounded(0.3, min=0.0, max=10.0, doc="eta")
    std: Literal["global", "group"] = "group"
    std_eps: float = bounded(1e-8, min=0.0)
    unbiased_std: bool = True
    timestep_fraction: float = bounded(0.6, min=0.0, max=1.0, doc="share of steps 0 .. T-2 trained per trajectory, "
                                       "drawn at random")
    share_noise: bool = bounded(True, doc="one initial noise per group (--init_same_noise)")


@register_method
class DanceGRPO(PolicyGradientMethod):
    name = "dance_grpo"
    title = "DanceGRPO"
    paper = "arXiv 2505.07818"
    Options = DanceGRPOOptions

    def plan(self, sigmas: torch.Tensor, iteration: int, select: list[int] | None) -> tuple[list[Node], torch.Tensor]:
        T = self.train.steps
        return independent_plan(self, sigmas, iteration, select, list(range(T)), list(range(T - 1)),
                                train_fraction=self.options.timestep_fraction, share_noise=self.options.share_noise)
