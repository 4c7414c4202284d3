"""Coefficients-Preserving Sampling (arXiv 2509.05952) as the SDE noise of any GRPO method.

``std = σ_next·sin(aπ/2)``, ``μ = (1-σ_next)·x̂0 + sqrt(σ_next² - std²)·ε̂``: the noise the step adds is exactly
what the schedule expects at σ_next, so samples keep the marginals of the ODE (no over-noised images).
``logp``: ``flow_grpo`` is Flow-GRPO's ``-mean((x'-μ)²)`` (constants and the variance dropped: every step
weighs alike), ``gaussian`` the exact Gaussian log-prob (its 1/std² lets the last, least noisy steps
dominate the gradient).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..methods import register_modifier
from ..methods.base import Modifier
from ..samplers.kernels import cps
from ..typed import bounded


@dataclass
class CPSOptions:
    noise_level: float = bounded(0.8, min=0.0, max=1.0, doc="a: std = sigma_next * sin(a*pi/2)")
    logp: Literal["flow_grpo", "gaussian"] = bounded("flow_grpo", doc="Flow-GRPO's -mean((x'-mu)^2), or the "
                                                     "exact Gaussian")


@register_modifier
class CPS(Modifier):
    name = "cps"
    title = "CPS noise"
    Options = CPSOptions
    combines_with = frozenset({"policy_gradient"})

    def noise_schedule(self, schedule):
        return cps(self.options.noise_level, self.options.logp)
