"""LayerTuning-RL (Dynamic-TreeRPO, Eq. 13; paper-approximate): regress toward each group's best path.

Per group the path to the max-reward leaf is the best path. At every step on it, ``V*`` is the velocity
that would have produced the step it took (the kernel's mean is affine in v: ``step_mean(V*, x_t) = x_{t+1}``);
the term ``λ·w·||v_θ(x_t) - V*||²`` pulls the policy toward it, supervised fine-tuning on the best path in
velocity space. The paper gives no weight: ``advantage`` weighs a group by its best leaf's positive
advantage (a flat group's "best" is noise and weighs 0: the reviewers' "best of the worst" risk),
``uniform`` by 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..methods import register_modifier
from ..methods.base import Modifier
from ..samplers.kernels import NoiseSchedule, step_mean
from ..typed import bounded


@dataclass
class LayerTuningOptions:
    weight: float = bounded(0.1, min=0.0, doc="lambda of the regression term")
    group_weight: Literal["advantage", "uniform"] = bounded(
        "advantage", doc="per group: the best leaf's positive advantage, or 1 (paper-approximate)")


@register_modifier
class LayerTuning(Modifier):
    name = "layer_tuning"
    title = "LayerTuning-RL"
    Options = LayerTuningOptions
    combines_with = frozenset({"tree_grpo", "flow_grpo", "dance_grpo", "mix_grpo"})
    whole_prompts = "each group's best path is chosen among all of the group's leaves"

    def prepare(self, trainer, batch) -> None:
        rollout = batch.rollout
        weights = best_path_weights(batch.rewards, batch.leaf_advantages, rollout.leaf_group,
                                    rollout.transition_leaves, self.options.group_weight)
        targets = velocity_targets(rollout.x, rollout.x_next, rollout.sigma, rollout.sigma_next, trainer.schedule,
                                   rollout.scale)
        batch.extras[self.name] = (weights, targets)

    def loss_term(self, trainer, batch, idx, velocity, out):
        weights, targets = batch.extras[self.name]
        tuning = layer_tuning_loss(velocity, targets[idx], weights[idx])
        return self.options.weight * tuning, {"layer_tuning": tuning.detach()}


def best_path_weights(leaf_rewards: torch.Tensor, leaf_adv: torch.Tensor, leaf_group: torch.Tensor,
                      transition_leaves: torch.Tensor, weight: str = "advantage") -> torch.Tensor:
    """Per transition: the weight of the term (0 off the best paths). ``transition_leaves``: bool ``[T, L]``,
    the leaves below each transition; NaN rewards (skipped samples) are never best."""
    rewards = torch.where(torch.isfinite(leaf_rewards), leaf_rewards, torch.full_like(leaf_rewards, -torch.inf))
    groups, inverse = torch.unique(leaf_group, return_inverse=True)
    best_reward = torch.full((len(groups),), -torch.inf, device=rewards.device).scatter_reduce(
        0, inverse, rewards, reduce="amax")
    is_best = (rewards == best_reward[inverse]) & torch.isfinite(rewards)
    # one best leaf per group: the first of ties
    first = torch.full((len(groups),), len(rewards), device=rewards.device, dtype=torch.long).scatter_reduce(
        0, inverse[is_best], torch.nonzero(is_best).squeeze(1), reduce="amin")
    best = torch.zeros_like(is_best)
    best[first[first < len(rewards)]] = True
    if weight == "advantage":
        leaf_weight = torch.where(best, leaf_adv.clamp(min=0), torch.zeros_like(leaf_adv))
    elif weight == "uniform":
        leaf_weight = best.float()
    else:
        raise ValueError(f"layer_tuning group_weight: expected advantage or uniform, got {weight!r}")
    # a transition lies on the best path of at most one group: its leaves all belong to one prompt
    return (transition_leaves.float() * leaf_weight).amax(dim=1)


def velocity_targets(x: torch.Tensor, x_next: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                     schedule: NoiseSchedule, scale: torch.Tensor) -> torch.Tensor:
    """``V*``: the velocity whose step mean is the stored next state (``mean = a + b·v`` solved for v)."""
    zeros = torch.zeros_like(x, dtype=torch.float32)
    a, _ = step_mean(zeros, x, sigma, sigma_next, schedule, scale)
    b, _ = step_mean(torch.ones_like(zeros), x, sigma, sigma_next, schedule, scale)
    return (x_next.float() - a) / (b - a)


def layer_tuning_loss(v: torch.Tensor, v_target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_i w_i·mean((v_i - V*_i)²) / n``: averaged over the batch like the policy loss."""
    per_transition = (v.float() - v_target).pow(2).flatten(1).mean(dim=1)
    return (weights * per_transition).sum() / max(len(weights), 1)
