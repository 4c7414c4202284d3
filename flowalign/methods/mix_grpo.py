"""MixGRPO (arXiv 2507.21802): SDE only inside a sliding window of steps, ODE outside.

The window (``window_size`` 4 steps) starts at step 0 and moves by ``window_stride`` every ``window_dwell``
iterations (25; progressive with overlap), staying below step ``T - 2`` and rolling back to the start;
only window steps are stochastic and trained, so each iteration trains 4 steps instead of all. Multi-reward
runs normalise each reward within its groups before summing (``reward.aggregate: advantage``).
MixGRPO-Flash adds ``modifiers: {flash: {}}``: after the window, DPM-Solver++ finishes on fewer steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..algorithms.grpo.advantages import aggregated_advantages, trimmed_group_advantages
from ..samplers.rollout import Node
from ..samplers.windows import WindowSchedule
from ..typed import bounded
from . import register_method
from .base import require
from .policy_gradient import PolicyGradientMethod, PolicyGradientOptions, independent_plan


@dataclass
class MixGRPOOptions(PolicyGradientOptions):
    group_size: int = bounded(12, min=2, doc="trajectories per prompt (G)")
    window_kind: Literal["random", "progressive", "decay", "exp_decay", "fixed"] = bounded(
        "progressive", doc="how the SDE window moves: random, progressive (slides forward), decay / exp_decay "
        "(slides with a shrinking dwell), fixed")
    window_size: int = bounded(4, min=1, doc="SDE steps in the window")
    window_dwell: int = bounded(25, min=1, doc="iterations before the window moves")
    window_stride: int = bounded(1, min=1, doc="how far it moves (1: overlapping)")
    window_roll_back: bool = bounded(True, doc="restart at step 0 past the end (else stay at the end)")
    window_max_steps: int | None = bounded(None, min=1, doc="the window stays below this step (default steps - 2)")
    window_empty_dwell: bool = bounded(False, doc="at the end of a cycle, dwell once on an empty window (no step "
                                       "trained) before rolling back, as MixGRPO's code does")
    trimmed_ratio: float = bounded(0.0, min=0.0, max=1.0, doc="group mean and std without the lowest "
                                   "int(G*ratio) rewards (MixGRPO's trimmed statistics; 0: off)")
    rerange: Literal["none", "balance"] = bounded(
        "none", doc="balance: updates alternate positive- and negative-advantage transitions, zero ones dropped "
        "(MixGRPO's advantage_rerange_strategy=balance); none: the order shuffle gives")
    share_noise: bool = bounded(False, doc="one initial noise per group")


def sliding_window(options, seed: int, max_steps: int, size: int | None = None) -> WindowSchedule:
    """MixGRPO's window schedule (also Dynamic-TreeRPO's): a pure function of the iteration."""
    return WindowSchedule(options.window_kind, size=size or options.window_size, dwell=options.window_dwell,
                          stride=options.window_stride, roll_back=options.window_roll_back,
                          max_steps=options.window_max_steps or max_steps, seed=seed,
                          empty_dwell=getattr(options, "window_empty_dwell", False))


@register_method
class MixGRPO(PolicyGradientMethod):
    name = "mix_grpo"
    title = "MixGRPO"
    paper = "arXiv 2507.21802"
    Options = MixGRPOOptions

    @classmethod
    def check(cls, options, train, modifiers) -> None:
        last = options.window_max_steps or train.steps - 2
        require(0 < options.window_size <= last, f"mix_grpo.window_size: {options.window_size} must be in [1, "
                f"{last}] (the window stays below step {last} of train.steps={train.steps})")

    def sde_window(self, iteration: int) -> list[int]:
        T = self.train.steps
        return sliding_window(self.options, self.train.seed, T - 2).steps(iteration, T)

    @property
    def reorders(self) -> bool:
        return self.options.rerange == "balance"

    def update_order(self, order: torch.Tensor, advantages: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``rerange: balance``: positive and negative transitions, each shuffled, taken in turns (the smaller
        side first), the rest of the larger side after; zero-advantage ones dropped, as MixGRPO's code."""
        if self.options.rerange != "balance":
            return order
        sign = advantages[order]
        pos, neg = order[sign > 0], order[sign < 0]
        pos = pos[torch.randperm(len(pos), generator=generator)]
        neg = neg[torch.randperm(len(neg), generator=generator)]
        small, large = (pos, neg) if len(pos) < len(neg) else (neg, pos)
        paired = torch.stack([small, large[:len(small)]], dim=1).flatten()
        return torch.cat([paired, large[len(small):]])

    def leaf_advantages(self, rewards, groups, parts=None, weights=None) -> torch.Tensor:
        """Group z-scores; with ``trimmed_ratio`` > 0 MixGRPO's trimmed group statistics (per reward first when
        ``reward.aggregate: advantage``)."""
        o = self.options
        if not o.trimmed_ratio:
            return super().leaf_advantages(rewards, groups, parts, weights)
        norm = dict(ratio=o.trimmed_ratio, eps=o.std_eps, unbiased=o.unbiased_std)
        if parts:
            return aggregated_advantages(parts, weights, groups, trimmed_group_advantages, **norm)
        return trimmed_group_advantages(rewards, groups, **norm)

    def plan(self, sigmas: torch.Tensor, iteration: int, select: list[int] | None) -> tuple[list[Node], torch.Tensor]:
        window = self.sde_window(iteration)
        return independent_plan(self, sigmas, iteration, select, window, window, share_noise=self.options.share_noise)
