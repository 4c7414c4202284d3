"""Dr. GRPO on flow models (arXiv 2503.20783's fix applied to Flow-GRPO): advantages centred within each group
but not divided by a standard deviation.

Dividing by the std gives a group of near-identical samples the same advantage scale as a group whose rewards
differ a lot, so tiny reward differences (noise, or an "illusory advantage") are amplified; ``R - mean_group(R)``
keeps each group's own scale. Everything else is Flow-GRPO's (sampling, trained steps, clipped ratio); it
combines with CPS, GRPO-Guard and KL. The optimizer (Adam) absorbs the overall scale of the advantages.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..typed import bounded
from . import register_method
from .flow_grpo import FlowGRPO
from .policy_gradient import SDEOptions


@dataclass
class DrGRPOOptions(SDEOptions):
    """Flow-GRPO's options without the std ones (nothing is divided by a std)."""

    group_size: int = bounded(24, min=2, doc="trajectories per prompt (k)")
    timestep_fraction: float = bounded(0.99, min=0.0, max=1.0, doc="trains steps 0 .. int(T*f) - 1")
    share_noise: bool = bounded(False, doc="one initial noise per group")


@register_method
class DrGRPO(FlowGRPO):
    name = "dr_grpo"
    title = "Dr. GRPO (Flow-GRPO, mean-centred advantages)"
    paper = "arXiv 2503.20783"
    Options = DrGRPOOptions

    def leaf_advantages(self, rewards: torch.Tensor, groups: torch.Tensor,
                        parts: dict[str, torch.Tensor] | None = None,
                        weights: dict[str, float] | None = None) -> torch.Tensor:
        if parts:
            return sum(weights[name] * centred(r, groups) for name, r in parts.items())
        return centred(rewards, groups)


def centred(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``R - mean_group(R)`` per sample (vectorised over groups)."""
    _, inverse = torch.unique(groups, return_inverse=True)
    count = torch.zeros(int(inverse.max()) + 1, device=rewards.device).index_add(0, inverse, torch.ones_like(rewards))
    total = torch.zeros_like(count).index_add(0, inverse, rewards.float())
    return rewards.float() - (total / count)[inverse]
