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


def dpm_solver_pp(velocity: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor, order: int = 2) -> torch.Tensor:
    """DPM-Solver++ (multistep, data prediction) from ``sigmas[0]`` to ``sigmas[-1]`` in flow coordinates.

    With ``α = 1-σ`` and ``λ = log(α/σ)``, the data prediction is ``x̂0 = x - σ·v``; a first-order step is
    ``x' = (σ'/σ)·x - α'·(e^{-h} - 1)·x̂0`` (``h = λ' - λ``), the second order extrapolates ``x̂0`` from the
    previous step (2M). The final step to σ = 0 is first order (it returns ``x̂0``), as diffusers'
    ``lower_order_final`` does. MixGRPO-Flash finishes its trajectories with it after the SDE window.
    """
    if order not in (1, 2):
        raise ValueError(f"dpm_solver_pp: order must be 1 or 2, got {order}")
    sigmas = sigmas.float()
    x = x.float()
    prev_x0, prev_h = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = x - sigma * velocity(x, sigma).float()
        if sigma_next <= 0:
            x = x0
            break
        h = _lam(sigma_next) - _lam(sigma)
        d = x0
        if order == 2 and prev_x0 is not None and i < len(sigmas) - 2:
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        x = (sigma_next / sigma) * x - (1 - sigma_next) * torch.expm1(-h) * d
        prev_x0, prev_h = x0, h
    return x


def _lam(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR in flow coordinates: ``log((1-σ)/σ)``."""
    return torch.log(1 - sigma) - torch.log(sigma)
