"""MixGRPO-Flash: after the SDE window, finish the trajectories with DPM-Solver++ on fewer steps.

The rollout runs the model's grid up to the end of the window; the rest is re-spaced and solved with
DPM-Solver++ (2M, data prediction), which the rollout's NFE count includes. Nothing after the window is trained,
so the update is unchanged. Tail spacing: ``interpolate`` puts ``max(int((T - 1 - last)·fraction), 1)`` steps
evenly along the model's own grid; ``paper`` is MixGRPO's code: ``max(int((T - last)·fraction), 1)`` points of
``linspace(t_{last+1}, 0)`` in unshifted time ``t = 1 - i/T``, shifted by ``shift`` (at least 2 points here, so
the tail reaches σ = 0; the code decodes from its last point), starting at the grid's ``σ_{last+1}``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from ..methods import register_modifier
from ..methods.base import Modifier
from ..samplers.ode import dpm_solver_pp
from ..typed import bounded


@dataclass
class FlashOptions:
    fraction: float = bounded(0.4, min=0.0, max=1.0, doc="tail steps = max(int((T - 1 - last) * fraction), 1)")
    order: int = bounded(2, min=1, max=2, doc="DPM-Solver++ order")
    tail: Literal["interpolate", "paper"] = bounded(
        "interpolate", doc="interpolate: evenly along the model's grid; paper: MixGRPO's re-spaced, shifted tail")
    shift: float = bounded(3.0, min=0.01, max=100.0, doc="paper tail: the time shift of its spacing (3 for FLUX)")


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
        if self.options.tail == "paper":
            return sigmas[:last + 2], paper_tail(sigmas, last, self.options.fraction, self.options.shift)
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


def paper_tail(sigmas: torch.Tensor, last: int, fraction: float, shift: float) -> torch.Tensor:
    """MixGRPO's post-window grid: ``max(int((T - last)·fraction), 2)`` points of ``linspace(1 - (last+1)/T, 0)``
    through ``s·t / (1 + (s-1)·t)``; its first point is the grid's own ``σ_{last+1}`` (the same value when the
    grid is the shifted linspace)."""
    T = len(sigmas) - 1
    t = torch.linspace(1 - (last + 1) / T, 0, max(int((T - last) * fraction), 2), device=sigmas.device)
    tail = shift * t / (1 + (shift - 1) * t)
    tail[0] = sigmas[last + 1]
    return tail
