"""Group-relative advantages (docs/methods/flow_grpo.md, dance_grpo.md): z-scores of rewards within each prompt's group.

Flow-GRPO's ``PerPromptStatTracker``: ``A = (R - mean_prompt(R)) / (std + eps)`` with the std over the
whole gathered batch (``global``) or per prompt; DanceGRPO: per group, unbiased std, eps 1e-8.
"""
from __future__ import annotations

from typing import Literal

import torch


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, std: Literal["global", "group"] = "global",
                     eps: float = 1e-4, unbiased: bool = False, zero_below: float = 0.0) -> torch.Tensor:
    """Per-sample advantages from rewards ``[N]`` and group ids ``[N]`` (vectorised, no host sync); a sample
    whose std (its group's, or the batch's) is below ``zero_below`` gets 0 (BranchGRPO: 1e-6, all rewards equal)."""
    rewards = rewards.float()
    _, inverse = torch.unique(groups, return_inverse=True)
    count = torch.zeros(int(inverse.max()) + 1 if inverse.numel() else 0, device=rewards.device)
    count = count.index_add(0, inverse, torch.ones_like(rewards))
    mean = torch.zeros_like(count).index_add(0, inverse, rewards) / count
    centred = rewards - mean[inverse]
    if std == "global":
        scale = rewards.std(unbiased=unbiased) if rewards.numel() > 1 else rewards.new_tensor(0.0)
    else:
        sq = torch.zeros_like(count).index_add(0, inverse, centred ** 2)
        denom = (count - 1).clamp_min(1) if unbiased else count
        scale = (sq / denom).sqrt()[inverse]
    return torch.where(scale < zero_below, torch.zeros_like(centred), centred / (scale + eps))


def trimmed_group_advantages(rewards: torch.Tensor, groups: torch.Tensor, ratio: float, eps: float = 1e-8,
                             unbiased: bool = True) -> torch.Tensor:
    """MixGRPO's ``trimmed_ratio``: each group's mean and std over its rewards without the lowest
    ``min(int(G·ratio), G-1)`` (outliers below cannot drag the baseline down), then ``(R - mean) / (std + eps)``
    for every member. A loop over groups: run once per iteration on the gathered rewards."""
    rewards, adv = rewards.float(), torch.zeros_like(rewards, dtype=torch.float32)
    for group in torch.unique(groups):
        members = groups == group
        kept = torch.sort(rewards[members]).values
        kept = kept[min(int(len(kept) * ratio), len(kept) - 1):]
        std = kept.std(unbiased=unbiased) if len(kept) > 1 else kept.new_tensor(0.0)
        adv[members] = (rewards[members] - kept.mean()) / (std + eps)
    return adv


def transition_advantages(leaf_advantages: torch.Tensor, transition_leaves: torch.Tensor,
                          reduce: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """Each transition's advantage from the leaves credited to it (one leaf for independent trajectories)."""
    weights = transition_leaves.float()
    total = weights @ leaf_advantages.float()
    return total if reduce == "sum" else total / weights.sum(1).clamp_min(1)


def aggregated_advantages(parts: dict[str, torch.Tensor], weights: dict[str, float], groups: torch.Tensor,
                          estimator=group_advantages, **kwargs) -> torch.Tensor:
    """MixGRPO's ``advantage_aggr``: normalise each reward within its groups, then sum with the weights,
    so a reward with a large scale cannot drown the others."""
    return sum(weights[name] * estimator(r, groups, **kwargs) for name, r in parts.items())


def prob_weighted_node_rewards(leaf_rewards: torch.Tensor, node_leaves: torch.Tensor, node_depth: torch.Tensor,
                               edge_logp: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """BranchGRPO's probability-weighted node rewards, bottom-up: a node with children takes
    ``Σ_c softmax(temperature · logp_c) · reward_c`` over them (``logp_c``: the log-prob of the step into child c),
    a node without children the mean of its leaves. Leaves outside ``node_leaves`` (skipped) leave their nodes
    out of the softmax; a node with none left is NaN. A loop over nodes: run once per iteration."""
    leaves = node_leaves.float()
    overlap = (leaves @ leaves.T) > 0
    children = overlap & (node_depth[:, None] + 1 == node_depth[None, :])  # [parent, child]
    reward = torch.full((len(node_depth),), float("nan"), device=leaf_rewards.device)
    for n in sorted(range(len(node_depth)), key=lambda i: -int(node_depth[i])):  # deepest first
        kids = children[n].nonzero().flatten()
        kids = kids[torch.isfinite(reward[kids])]
        if len(kids):
            weights = torch.softmax(temperature * edge_logp[kids].float(), dim=0)
            reward[n] = (weights * reward[kids]).sum()
        elif not children[n].any() and bool(node_leaves[n].any()):
            reward[n] = leaf_rewards.float()[node_leaves[n]].mean()
    return reward


def node_advantages(leaf_rewards: torch.Tensor, node_leaves: torch.Tensor, node_group: torch.Tensor,
                    node_reward: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Tree advantages (BranchGRPO / Dynamic-TreeRPO): a node's reward is the mean of the leaves below it (or
    ``node_reward``, e.g. probability-weighted; NaN: none), normalised among the nodes of its group (the same
    prompt and depth)."""
    weights = node_leaves.float()
    if node_reward is None:
        has_leaves = weights.sum(1) > 0
        node_reward = (weights @ leaf_rewards.float()) / weights.sum(1).clamp_min(1)
    else:
        has_leaves = torch.isfinite(node_reward)
    adv = torch.zeros_like(node_reward)
    adv[has_leaves] = group_advantages(node_reward[has_leaves], node_group[has_leaves], **kwargs)
    return adv
