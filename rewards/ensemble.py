"""Conservative objectives over a reward ensemble (Coste et al., "Reward Model Ensembles Help Mitigate
Overoptimization", ICLR 2024): each sample's score is formed from its K member scores, so an update pays only
for what the members agree on.

- ``mean``: the weighted mean of the members;
- ``uncertainty_weighted`` (UWO): the weighted mean minus ``penalty`` times the members' weighted variance
  (population variance, as the paper's best-of-n code; its PPO code uses the unbiased one);
- ``worst_case`` (WCO): the smallest member score (no hyper-parameter; the members' weights must be equal).

The members are compared after per-member normalisation (``reward.normalize``), which the composite reward
applies before calling ``ensemble_score``; ``weighted_sum`` is the plain weighted sum of the parts.
"""
from __future__ import annotations

from typing import Literal

import torch

Objective = Literal["weighted_sum", "mean", "uncertainty_weighted", "worst_case"]
OBJECTIVES: tuple[str, ...] = ("weighted_sum", "mean", "uncertainty_weighted", "worst_case")


def ensemble_score(scores: dict[str, torch.Tensor], weights: dict[str, float], objective: Objective = "weighted_sum",
                   penalty: float = 0.5) -> torch.Tensor:
    """Each sample's objective over its member scores ([B] per member, by name); a NaN member score (a skipped
    sample) makes that sample's objective NaN."""
    if objective == "weighted_sum":
        return sum(weights[k] * s for k, s in scores.items())
    members = torch.stack(list(scores.values()))  # [K, B]
    if objective == "worst_case":
        return members.amin(dim=0)
    w = torch.tensor([weights[k] for k in scores], dtype=members.dtype, device=members.device)[:, None] / \
        sum(weights[k] for k in scores)
    mean = (w * members).sum(dim=0)
    if objective == "mean":
        return mean
    if objective == "uncertainty_weighted":
        return mean - penalty * (w * (members - mean) ** 2).sum(dim=0)
    raise ValueError(f"reward objective: expected one of {', '.join(OBJECTIVES)}, got '{objective}'")
