"""Flow-GRPO (arXiv 2505.05470): GRPO on flow-matching models through an SDE sampler.

Every step is an SDE step ``μ = x + Δσ·(v + g²/(2σ)·ε̂)``, ``g = a·sqrt(σ/(1-σ))``; ``group_size`` independent
trajectories per prompt; the advantage ``(R - mean_prompt) / (std + 1e-4)`` (std over the gathered batch)
credits every trained step; the first ``int(T·timestep_fraction)`` steps are trained, in order.
Combines with the Fast window (Flow-GRPO-Fast: SDE in a random 2-3 step window only), Flash after that
window, CPS noise, GRPO-Guard, KL to the LoRA-off base and LayerTuning-RL. Pref-GRPO is this method with
a pairwise reward (win rates within each group).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..samplers.rollout import Node
from ..typed import bounded
from . import register_method
from .policy_gradient import PolicyGradientMethod, PolicyGradientOptions, independent_plan


@dataclass
class FlowGRPOOptions(PolicyGradientOptions):
    group_size: int = bounded(24, min=2, doc="trajectories per prompt (k)")
    timestep_fraction: float = bounded(0.99, min=0.0, max=1.0, doc="trains steps 0 .. int(T*f) - 1")
    share_noise: bool = bounded(False, doc="one initial noise per group (ODE prefix shared before the first SDE step)")


@register_method
class FlowGRPO(PolicyGradientMethod):
    name = "flow_grpo"
    title = "Flow-GRPO"
    paper = "arXiv 2505.05470"
    Options = FlowGRPOOptions

    def steps(self, iteration: int) -> tuple[list[int], list[int]]:
        """The SDE steps and the trained steps: all / the first ``int(T·f)``, or the Fast window's."""
        window = self.sde_window(iteration)
        if window is not None:
            return window, window
        T = self.train.steps
        return list(range(T)), list(range(max(1, int(T * self.options.timestep_fraction))))

    def sde_window(self, iteration: int) -> list[int] | None:
        fast = self.modifiers.get("fast")
        return None if fast is None else fast.window(self.train.steps, self.train.seed).steps(iteration,
                                                                                              self.train.steps)

    def plan(self, sigmas: torch.Tensor, iteration: int, select: list[int] | None) -> tuple[list[Node], torch.Tensor]:
        sde, trained = self.steps(iteration)
        return independent_plan(self, sigmas, iteration, select, sde, trained, share_noise=self.options.share_noise)
