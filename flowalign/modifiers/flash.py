"""MixGRPO-Flash: after the SDE window, finish the trajectories with DPM-Solver++ on fewer steps.

The rollout runs the model's grid up to the end of the window; the rest is re-spaced onto
``max(int((T - 1 - last)·fraction), 1)`` steps and solved with DPM-Solver++ (2M, data prediction), which the
rollout's NFE count includes. Nothing after the window is trained, so the update is unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..methods import register_modifier
from ..methods.base import Modifier
from ..samplers.ode import dpm_solver_pp
from ..typed import bounded


@dataclass
class FlashOptions:
    fraction: float = bounded(0.4, min=0.0, max=1.0, doc="tail steps = max(int((T - 1 - last) * fraction), 1)")
    order: int = bounded(2, min=1, max=2, doc="DPM-Solver++ order")


@register_modifier
class Flash(Modifier):
    name = "flash"
    title = "MixGRPO-Flash"
    Options = FlashOptions
    combines_with = frozenset({"mix_grpo", "flow_grpo"})
    #: with Flow-GRPO the window comes from the Fast modifier
    requires = {"flow_grpo": "fast"}

    def rollout_grid(self, sigmas: torch.Tensor, tail, window: list[int] | None):
        T = len(sigmas) - 1
        last = max(window)
        if last + 1 >= T:
            return sigmas, None
        n = max(int((T - 1 - last) * self.options.fraction), 1)
        position = torch.linspace(last + 1, T, n + 1, device=sigmas.device)
        low = position.floor().long().clamp(max=T - 1)
        return sigmas[:last + 2], torch.lerp(sigmas[low], sigmas[low + 1], position - low)

    def finish_rollout(self, rollout, tail, velocity, batch_size: int):
        if tail is None:
            return rollout
        finished = []
        for start in range(0, rollout.leaves.shape[0], batch_size):
            rows = rollout.leaf_row[start:start + batch_size]
            finished.append(dpm_solver_pp(lambda x, sigma: velocity(x, sigma, rows),
                                          rollout.leaves[start:start + batch_size], tail, self.options.order))
        nfe = (len(tail) - 1) * rollout.leaves.shape[0]
        return dataclasses.replace(rollout, leaves=torch.cat(finished), nfe=rollout.nfe + nfe)
