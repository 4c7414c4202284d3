"""BranchGRPO's pruning (docs/methods/tree_grpo.md): which of a tree's stored transitions the update trains.

Sampling and advantages are untouched; pruning only leaves transitions out of the loss. **Depth pruning**
leaves out the transitions into chosen depths (depth d: the state after d steps), optionally sliding the
chosen depths up by one every ``interval`` iterations until the shallowest reaches ``stop``. **Width
pruning** acts on the last layer (the steps after the last split): ``per_branch`` keeps the best ``ratio``
of each last branch's transitions by advantage, ``best_worst`` the best and the worst of a prompt's.
"""
from __future__ import annotations

from typing import Literal

import torch


def sliding_depths(depths: list[int], iteration: int, interval: int, stop: int) -> list[int]:
    """The depths pruned at ``iteration`` (0-based): ``depths`` moved up by ``(iteration + 1) // interval``,
    never so far that the shallowest goes above ``stop`` (BranchGRPO counts training steps from 1)."""
    shift = min((iteration + 1) // interval, max(0, min(depths) - stop))
    return [d - shift for d in depths]


def depth_kept(step: torch.Tensor, depths: list[int]) -> torch.Tensor:
    """bool ``[T]``: the transitions not into ``depths`` (the transition out of grid step s is into depth s+1)."""
    return ~torch.isin(step + 1, torch.tensor(depths, dtype=step.dtype, device=step.device))


def width_kept(step: torch.Tensor, branch: torch.Tensor, prompt: torch.Tensor, advantages: torch.Tensor,
               last_split: int, mode: Literal["per_branch", "best_worst"], ratio: float) -> torch.Tensor:
    """bool ``[T]``: after width pruning of the transitions after step ``last_split``. ``per_branch``: per last
    branch, the best ``max(1, ⌊n·ratio⌋)``; ``best_worst``: per prompt, of ``k = max(2, ⌊n·ratio⌋)`` the best
    ``k // 2`` and the worst ``k - k // 2``. Ties keep the earlier transition (the tree depth first, then its
    step), as BranchGRPO's stable sort over its depth-first list. A loop over groups: once per iteration."""
    kept = torch.ones(len(step), dtype=torch.bool)
    last = (step > last_split).nonzero().flatten()
    group = (branch if mode == "per_branch" else prompt)[last]
    for g in group.unique():
        members = last[group == g]
        members = members[torch.argsort(branch[members] * (int(step.max()) + 1) + step[members], stable=True)]
        ranked = members[torch.argsort(-advantages[members].float(), stable=True)]
        n = len(ranked)
        if mode == "per_branch":
            chosen = ranked[:max(1, int(n * ratio))]
        else:
            k = max(2, int(n * ratio))
            chosen = ranked if k >= n else torch.cat([ranked[:k // 2], ranked[n - (k - k // 2):]])
        kept[members] = False
        kept[chosen] = True
    return kept
