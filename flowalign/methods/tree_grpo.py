"""Dynamic-TreeRPO (arXiv 2509.23352): a binary tree of trajectories inside a sliding SDE window.

Per prompt a tree of depth ``tree_depth`` (2^depth leaves sharing prefixes) splits at the first steps of a
sliding SDE window (MixGRPO's schedule), ODE outside; the noise of a depth-k node is scaled by
``1 + depth_noise_beta·k/d``. A node's reward is the mean of the leaves below it, normalised among the nodes of
its prompt and depth (BranchGRPO's per-depth advantages). With ``clip_dynamic`` each transition's clip bound
is ``clip_low + (clip_high - clip_low)·tanh(clip_eta·|A|)``. LayerTuning-RL is the ``layer_tuning`` modifier.

Paper-approximate (the paper gives the shapes, not the constants): the depth-noise form, the clip form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..algorithms.grpo.advantages import node_advantages, prob_weighted_node_rewards
from ..algorithms.grpo.loss import reward_conditioned_clip
from ..algorithms.grpo.pruning import depth_kept, sliding_depths, width_kept
from ..samplers.rollout import Node, Rollout
from ..samplers.structures import linear_depth_noise, tree
from ..typed import bounded
from . import register_method
from .base import require
from .mix_grpo import sliding_window
from .policy_gradient import PolicyGradientMethod, PolicyGradientOptions


@dataclass
class TreeGRPOOptions(PolicyGradientOptions):
    tree_depth: int = bounded(4, min=1, max=8, doc="binary splits at the window's first steps (2^depth leaves)")
    depth_noise_beta: float = bounded(0.5, min=0.0, doc="noise x (1 + beta*depth/d) (paper-approximate)")
    window_kind: Literal["random", "progressive", "decay", "exp_decay", "fixed"] = bounded(
        "progressive", doc="how the branching window moves: random, progressive, decay, exp_decay, fixed (as "
        "MixGRPO's)")
    window_size: int = bounded(4, min=1, doc="SDE steps in the window (at least tree_depth)")
    window_dwell: int = bounded(25, min=1, doc="iterations before the window moves")
    window_stride: int = bounded(1, min=1, doc="how far the window moves")
    window_roll_back: bool = bounded(True, doc="start over at the first step once the window reaches the end")
    window_max_steps: int | None = bounded(None, min=1, doc="the window stays below this step (default steps - 1)")
    clip_dynamic: bool = bounded(False, doc="reward-conditioned clip bounds (paper-approximate)")
    clip_low: float = bounded(1e-4, min=0.0, doc="the ratio clip at advantage 0")
    clip_high: float = bounded(1e-3, min=0.0, doc="the ratio clip for large advantages")
    clip_eta: float = bounded(1.0, min=0.0, doc="how fast the clip rises with |A|: clip_low + (clip_high - clip_low) "
                                                "tanh(clip_eta |A|)")
    node_reward: Literal["mean", "prob_weighted"] = bounded(
        "mean", doc="a node's reward: the mean of its leaves (Dynamic-TreeRPO), or BranchGRPO's softmax over its "
        "children's step log-probs")
    node_temperature: float = bounded(1.0, min=0.0, doc="prob_weighted: the softmax's temperature (BranchGRPO: 1)")
    std: Literal["global", "group"] = "group"
    zero_std_below: float = bounded(0.0, min=0.0, doc="advantages 0 among nodes whose reward std is below this "
                                    "(BranchGRPO: 1e-6)")
    depth_pruning: list[int] = bounded([], doc="BranchGRPO: depths whose transitions are not trained (depth d: "
                                       "the state after d steps; sampling and rewards unchanged)")
    depth_pruning_slide: bool = bounded(False, doc="move the pruned depths up by one every slide_interval "
                                        "iterations")
    depth_pruning_slide_interval: int = bounded(1, min=1, doc="iterations between slides of the pruned depths")
    depth_pruning_stop_depth: int | None = bounded(None, min=0, doc="sliding stops when the shallowest pruned depth "
                                                   "reaches this (default: the last split step)")
    width_pruning: Literal["none", "per_branch", "best_worst"] = bounded(
        "none", doc="BranchGRPO's width pruning of the steps after the last split: the best of each last branch, "
        "or the best and worst of each prompt's")
    width_pruning_ratio: float = bounded(0.5, min=0.0, max=1.0, doc="the share of those transitions kept")
    pruning_until: float = bounded(1.0, min=0.0, max=1.0, doc="prune in this first share of the iterations only")


@register_method
class TreeGRPO(PolicyGradientMethod):
    name = "tree_grpo"
    title = "Dynamic-TreeRPO"
    paper = "arXiv 2509.23352"
    Options = TreeGRPOOptions
    shares_trunks = True
    whole_prompts = "a prompt's tree shares its prefixes"

    @classmethod
    def check(cls, options, train, modifiers) -> None:
        last = options.window_max_steps or train.steps - 1
        require(options.tree_depth <= last, f"tree_grpo.tree_depth: {options.tree_depth} splits need as many SDE "
                f"steps below step {last} (train.steps={train.steps})")
        require(options.window_size <= last, f"tree_grpo.window_size: {options.window_size} must be in [1, {last}] "
                f"(the window stays below step {last} of train.steps={train.steps})")
        require(all(1 <= d <= train.steps for d in options.depth_pruning), f"tree_grpo.depth_pruning: "
                f"{options.depth_pruning} must be depths in [1, {train.steps}] (train.steps={train.steps})")
        require(options.clip_low <= options.clip_high, f"tree_grpo.clip_low ({options.clip_low}) must not exceed "
                f"clip_high ({options.clip_high})")

    @property
    def samples_per_prompt(self) -> int:
        return 2 ** self.options.tree_depth

    def sde_window(self, iteration: int) -> list[int]:
        """MixGRPO's sliding window, kept whole at the end of its range so every tree has ``tree_depth`` splits
        (a window cut short there would silently give trees of fewer leaves)."""
        o, T = self.options, self.train.steps
        last, size = o.window_max_steps or T - 1, max(o.window_size, o.tree_depth)
        window = sliding_window(o, self.train.seed, last, size=size).steps(iteration, T)
        return window if len(window) == size else list(range(last - size, last))

    def plan(self, sigmas: torch.Tensor, iteration: int, select: list[int] | None) -> tuple[list[Node], torch.Tensor]:
        window = self.sde_window(iteration)
        return tree(sigmas, self.train.prompts_per_iteration, window[:self.options.tree_depth], branching=2,
                    sde_steps=window, depth_noise=linear_depth_noise(self.options.depth_noise_beta))

    def credit(self, rollout: Rollout, leaf_advantages: torch.Tensor, leaf_rewards: torch.Tensor) -> torch.Tensor:
        """A transition's advantage is its node's: the mean reward below it, normalised per prompt and depth
        (skipped leaves, NaN rewards, left out)."""
        o = self.options
        valid = torch.isfinite(leaf_rewards)
        rewards, below = torch.where(valid, leaf_rewards, torch.zeros_like(leaf_rewards)), rollout.node_leaves & valid
        node_reward = None
        if o.node_reward == "prob_weighted":
            node_reward = prob_weighted_node_rewards(rewards, below, rollout.node_depth, edge_log_probs(rollout),
                                                     o.node_temperature)
        adv = node_advantages(rewards, below, rollout.node_group, node_reward, std=o.std, eps=o.std_eps,
                              unbiased=o.unbiased_std, zero_below=o.zero_std_below)
        return adv[rollout.owner]

    def trained(self, rollout: Rollout, advantages: torch.Tensor, iteration: int) -> torch.Tensor | None:
        """BranchGRPO's depth and width pruning (while ``iteration + 1 <= ⌊iterations·pruning_until⌋``)."""
        o = self.options
        if (not o.depth_pruning and o.width_pruning == "none") or \
                iteration + 1 > int(self.train.iterations * o.pruning_until):
            return None
        last_split = max(self.sde_window(iteration)[:o.tree_depth])
        step, kept = rollout.step.cpu(), torch.ones(rollout.num_transitions, dtype=torch.bool)
        if o.depth_pruning:
            depths = o.depth_pruning if not o.depth_pruning_slide else sliding_depths(
                o.depth_pruning, iteration, o.depth_pruning_slide_interval,
                last_split if o.depth_pruning_stop_depth is None else o.depth_pruning_stop_depth)
            kept = depth_kept(step, depths)
        if o.width_pruning != "none":
            rest = kept.nonzero().flatten()  # width pruning ranks what depth pruning left, as BranchGRPO
            kept[rest] = width_kept(step[rest], rollout.owner.cpu()[rest], rollout.row.cpu()[rest],
                                    advantages.cpu()[rest], last_split, o.width_pruning, o.width_pruning_ratio)
        return kept

    def clip_bound(self, advantages: torch.Tensor) -> float | torch.Tensor:
        o = self.options
        return reward_conditioned_clip(advantages, o.clip_low, o.clip_high, o.clip_eta) if o.clip_dynamic \
            else o.clip_range


def edge_log_probs(rollout: Rollout) -> torch.Tensor:
    """``[N]``: the log-prob of each node's first stored step, the step into it from its parent (0 for a node with
    no stored step)."""
    n = rollout.node_leaves.shape[0]
    steps = torch.arange(len(rollout.owner), device=rollout.owner.device)
    first = torch.full((n,), len(rollout.owner), device=rollout.owner.device).scatter_reduce(
        0, rollout.owner, steps, reduce="amin")
    logp = torch.cat([rollout.logp.float(), rollout.logp.new_zeros(1).float()])
    return logp[first]
