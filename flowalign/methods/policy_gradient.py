"""The parts every method of the GRPO family has, with Flow-GRPO's defaults; each method file overrides some.

A policy-gradient method samples SDE rollouts (``plan``: which steps are stochastic, which are trained,
which trajectories share a trunk), turns rewards into leaf advantages (``leaf_advantages``) and those into
per-transition advantages (``credit``), and
trains the clipped-ratio loss, optionally weighted per step (``step_weights``) with a per-sample clip bound
(``clip_bound``). The trainer (``flowalign.training.policy_gradient``) runs these parts in that order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..algorithms.grpo.advantages import aggregated_advantages, group_advantages, transition_advantages
from ..samplers.kernels import NoiseSchedule, dance, ddim, flow_grpo
from ..samplers.rollout import Node, Rollout
from ..samplers.structures import independent
from ..typed import bounded
from .base import Method


@dataclass
class SDEOptions:
    """The SDE sampler and the clipped ratio (Flow-GRPO's defaults: arXiv 2505.05470, ``config/grpo.py``)."""

    noise: Literal["flow_grpo", "dance", "ddim"] = bounded(
        "flow_grpo", doc="SDE noise: flow_grpo g = a*sqrt(s/(1-s)), dance g = eta, ddim (DDIM-eta for eps/v models)")
    noise_level: float = bounded(0.7, min=0.0, max=10.0, doc="a (flow_grpo) or eta (dance, ddim)")
    clip_range: float = bounded(1e-4, min=0.0, doc="PPO clip of the per-step ratio")
    adv_clip: float = bounded(5.0, min=0.0, doc="advantages clamped to +-adv_clip")
    old_logp: Literal["rollout", "recompute"] = bounded(
        "rollout", doc="old log-probs as sampled, or recomputed in the training batches")
    shuffle: bool = bounded(True, doc="shuffle the stored transitions before splitting them into updates")
    inner_epochs: int = bounded(1, min=1, doc="passes over the iteration's transitions")
    drop_zero_advantage: bool = bounded(False, doc="leave transitions whose advantage is exactly 0 (a group whose "
                                        "rewards are all equal, a skipped sample) out of the update, as Flow-GRPO "
                                        "does; their number is logged as dropped_zero_advantage")


@dataclass
class PolicyGradientOptions(SDEOptions):
    """... and the group z-score advantages of GRPO."""

    std: Literal["global", "group"] = bounded("global", doc="advantage std over the whole batch or per group")
    std_eps: float = bounded(1e-4, min=0.0, doc="added to the advantage std")
    unbiased_std: bool = bounded(False, doc="the advantage std with Bessel's correction")


class PolicyGradientMethod(Method):
    """A GRPO-family method: SDE rollouts, group advantages, the clipped-ratio loss."""

    family = "policy_gradient"
    skips_failed_samples = True  # a NaN reward's sample gets advantage 0
    balances_rewards = True
    #: one root per prompt whose trajectories share a trunk; groups come from the plan (not ``group_size``)
    shares_trunks: ClassVar[bool] = False

    @property
    def shares_initial_noise(self) -> bool:
        """Whether a group's trajectories start from one noise (the ODE prefix before the first SDE step shared)."""
        return bool(getattr(self.options, "share_noise", False))

    def noise_schedule(self) -> NoiseSchedule:
        o = self.options
        return {"flow_grpo": flow_grpo, "dance": dance, "ddim": ddim}[o.noise](o.noise_level)

    def plan(self, sigmas: torch.Tensor, iteration: int, select: list[int] | None) -> tuple[list[Node], torch.Tensor]:
        """The rollout structure: plan roots and the prompt row each starts from (``select``: this process's
        trajectories, for methods without shared trunks)."""
        raise NotImplementedError

    def sde_window(self, iteration: int) -> list[int] | None:
        """The steps of a sliding or random SDE window (ODE elsewhere), None when every step is SDE."""
        return None

    def leaf_advantages(self, rewards: torch.Tensor, groups: torch.Tensor,
                        parts: dict[str, torch.Tensor] | None = None,
                        weights: dict[str, float] | None = None) -> torch.Tensor:
        """The advantage estimator, on every process's (valid) leaves: z-scores within each group; with
        ``parts`` (``reward.aggregate: advantage``) each reward is normalised first, then weighted and summed."""
        o = self.options
        norm = dict(std=o.std, eps=o.std_eps, unbiased=o.unbiased_std)
        if parts:
            return aggregated_advantages(parts, weights, groups, **norm)
        return group_advantages(rewards, groups, **norm)

    def trained(self, rollout: Rollout, advantages: torch.Tensor, iteration: int) -> torch.Tensor | None:
        """Which stored transitions the updates train (bool ``[T]``, on the host; None: all). Sampling and
        advantages are unchanged; the others are pruned (BranchGRPO's width and depth pruning)."""
        return None

    #: whether ``update_order`` may drop transitions (then every process splits its updates the same way)
    reorders: ClassVar[bool] = False

    def update_order(self, order: torch.Tensor, advantages: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The order (a subset) of the stored transitions the updates go through; as given by default."""
        return order

    def credit(self, rollout: Rollout, leaf_advantages: torch.Tensor, leaf_rewards: torch.Tensor) -> torch.Tensor:
        """Each stored transition's advantage: the mean over the leaves below it (one leaf per trajectory)."""
        return transition_advantages(leaf_advantages, rollout.transition_leaves, "mean")

    def step_weights(self, std: torch.Tensor) -> torch.Tensor | None:
        """Per-transition loss weights from the step's noise std (None: all 1)."""
        return None

    def clip_bound(self, advantages: torch.Tensor) -> float | torch.Tensor:
        """The ratio clip: one number, or one per transition."""
        return self.options.clip_range


def independent_plan(method: PolicyGradientMethod, sigmas: torch.Tensor, iteration: int, select: list[int] | None,
                     sde_steps: list[int], train_steps: list[int], train_fraction: float | None = None,
                     share_noise: bool = False) -> tuple[list[Node], torch.Tensor]:
    """``group_size`` independent trajectories per prompt (this process's ``select``ed share), SDE at
    ``sde_steps``, storing ``train_steps`` (or a random ``train_fraction`` of them per trajectory)."""
    t = method.train
    return independent(sigmas, t.prompts_per_iteration, method.options.group_size, sde_steps=sde_steps,
                       train_steps=train_steps, train_fraction=train_fraction, share_prefix=share_noise,
                       seed=t.seed * 7919 + iteration, select=select)
