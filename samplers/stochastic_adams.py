"""SA-Solver (stochastic Adams, arXiv 2309.05019) in the flow convention, as AWM's code samples its rollouts.

With ``α = 1-σ``, ``λ = log(α/σ)``, the data prediction ``D = x - σ·v`` and ``ρ = 1 + τ²``, a step from σ_s to σ_t
(``h = λ_t - λ_s``) in data-prediction form is

    x_t = (σ_t/σ_s)·e^{-τ²h}·x_s + α_t·(1 - e^{-ρh})·D_0 + α_t·ρ·(h²/2)·slope + σ_t·sqrt(1 - e^{-2τ²h})·ξ

where D_0 and ``slope`` come from the Lagrange polynomial through the last predictions in λ (order 1: ``D_0`` alone;
order 2: ``D_0`` and the divided difference). The slope's weight ``ρ·h²/2`` (instead of the exact exponential
integral) is the paper's Appendix D rescaling, which the code's few-step updates use. Predictor-corrector in PEC
mode: the predictor (Adams-Bashforth on ``D_s, D_{s-1}``) gives ``x_p``, one evaluation ``D_t = D(x_p, σ_t)``,
the corrector (Adams-Moulton on ``D_t, D_s``) recomputes ``x_t`` with the same noise ``ξ``. As the code: the
first step has no corrector, the final step's orders are lowered, a final σ of 0 returns the last ``D`` (from the
last predictor point), and τ is ``tau`` where the step's target σ lies in ``tau_interval``, 0 elsewhere.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: where AWM's code makes the sampler stochastic (``0.3 <= σ <= 0.9``, both ends included)
AWM_TAU_INTERVAL = (0.3, 0.9)


def sa_solver(velocity: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor,
              generators: Sequence[torch.Generator] | None = None, tau: float = 0.0,
              tau_interval: tuple[float, float] = AWM_TAU_INTERVAL, predictor_order: int = 2,
              corrector_order: int = 2) -> torch.Tensor:
    """Integrate from ``sigmas[0]`` (below 1) to ``sigmas[-1]`` with SA-Solver; ``velocity(x, σ)`` gets σ as a
    0-d tensor. ``generators``: one per sample (row of ``x``), each giving that sample's step noise in order, so
    a sample's trajectory does not depend on the batch it is in (needed when ``tau`` > 0)."""
    _check(x, sigmas, generators, tau, predictor_order, corrector_order)
    levels = [float(s) for s in sigmas.double().cpu()]
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    lam = [_lam(s) for s in levels]
    history = [_data(velocity, x, sigmas[0])]  # D at the points so far (the last two are kept)
    steps = len(levels) - 1
    for k in range(1, steps + 1):
        if k == steps and levels[k] == 0:
            return history[-1]
        step_tau = tau if tau_interval[0] <= levels[k] <= tau_interval[1] else 0.0
        noise = _noise(x, generators) if step_tau > 0 else torch.zeros_like(x)
        p_order = min(predictor_order, k, steps - k + 1)
        move = _Step(levels[k - 1], levels[k], lam[k - 1], lam[k], step_tau)
        slope = (history[-1] - history[-2]) / (lam[k - 1] - lam[k - 2]) if p_order == 2 else None
        x_p = move(x, history[-1], slope, noise)
        history = history[-1:] + [_data(velocity, x_p, sigmas[k])]
        c_order = min(corrector_order, steps - k + 2)
        first_without = k == 1 and predictor_order == 2  # the code's disable_first_corrector
        if c_order == 0 or first_without:
            x = x_p
        elif c_order == 1:
            x = move(x, history[-1], None, noise)
        else:
            x = move(x, history[-2], (history[-1] - history[-2]) / (lam[k] - lam[k - 1]), noise)
    return x


def awm_grid(sigmas: torch.Tensor) -> torch.Tensor:
    """AWM's code's SA-Solver grid from a sampling grid ending at 0: the last nonzero level is halved from the
    one before it (``t[-2] = t[-3] / 2``), and σ 1 becomes ``1 - 1e-3`` (λ finite); the start state stays the
    noise drawn for the unmodified grid."""
    grid = sigmas.float().clone()
    grid[-2] = grid[-3] / 2
    grid[0] = grid[0].clamp(max=1 - 1e-3)
    return grid


class _Step:
    """The update from σ_s to σ_t at a given τ, for ``D_0``, an optional slope in λ and the noise."""

    def __init__(self, sigma_s: float, sigma_t: float, lam_s: float, lam_t: float, tau: float) -> None:
        h, rho = lam_t - lam_s, 1 + tau ** 2
        self.keep = sigma_t / sigma_s * math.exp(-tau ** 2 * h)
        self.data = (1 - sigma_t) * -math.expm1(-rho * h)
        self.slope = (1 - sigma_t) * rho * h * h / 2
        self.noise = sigma_t * math.sqrt(-math.expm1(-2 * tau ** 2 * h))

    def __call__(self, x: torch.Tensor, d0: torch.Tensor, slope: torch.Tensor | None,
                 noise: torch.Tensor) -> torch.Tensor:
        out = self.keep * x + self.data * d0 + self.noise * noise
        return out if slope is None else out + self.slope * slope


def _data(velocity: VelocityFn, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The data prediction ``x - σ·v`` (float32 or wider)."""
    return x - sigma.to(x.dtype) * velocity(x, sigma).to(x.dtype)


def _noise(x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One standard normal draw per sample, each from its own generator (on its device), moved to ``x``."""
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype).to(x.device)
                        for g in generators])


def _lam(sigma: float) -> float:
    """Half log-SNR ``log((1-σ)/σ)`` (+inf at σ 0, where the final step returns D without using it)."""
    return math.log((1 - sigma) / sigma) if sigma > 0 else math.inf


def _check(x: torch.Tensor, sigmas: torch.Tensor, generators, tau: float, predictor_order: int,
           corrector_order: int) -> None:
    if predictor_order not in (1, 2) or corrector_order not in (0, 1, 2):
        raise ValueError(f"sa_solver: predictor_order must be 1 or 2 and corrector_order 0-2, got "
                         f"{predictor_order}, {corrector_order}")
    if len(sigmas) < 3 or not 0 < float(sigmas[0]) < 1 or float(sigmas[-2]) <= 0:
        raise ValueError("sa_solver: sigmas need at least 2 steps, start below 1 and stay above 0 before the end")
    if tau > 0 and (generators is None or len(generators) != x.shape[0]):
        raise ValueError("sa_solver: tau > 0 needs one generator per sample")
