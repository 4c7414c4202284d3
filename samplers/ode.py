"""Deterministic (ODE) sampling in the flow convention: ``x_next = x + (σ_next - σ)·v``."""
from __future__ import annotations

from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def euler_ode(velocity: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Integrate from ``sigmas[0]`` to ``sigmas[-1]`` with Euler steps; ``velocity(x, σ)`` gets σ as a 0-d tensor."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (sigma_next - sigma) * velocity(x, sigma)
    return x
