"""MARBLE (arXiv 2605.06507): several rewards balanced in gradient space instead of summed (``reward.aggregate:
marble``).

A weighted sum of rewards lets a sample that is excellent for one reward and indifferent to the others be
diluted, and the update often points against the worst-served reward. MARBLE gives each reward its own group
advantages ``A_k`` and so its own loss ``L_k``; from their gradients ``g_k`` (over the iteration's transitions,
every process's), normalised, the min-norm point of their convex hull

    α* = argmin_{α in the simplex} ‖Σ_k α_k ĝ_k‖²          (MGDA; no reward's loss rises to first order)

is smoothed, ``ᾱ ← ρ·ᾱ + (1-ρ)·α*``, and the update trains one combined advantage ``Σ_k c_k·A_k`` with
``c_k = ᾱ_k·s/‖g_k‖``: the policy loss is linear in the advantage at the sampling policy, so its gradient is
``s·Σ_k ᾱ_k ĝ_k`` with one backward per step (the paper's amortisation). ``s = Σ_k ᾱ_k‖g_k‖`` keeps the
advantages' scale (``c = ᾱ`` when the gradients have equal norms). Paper-approximate: ρ, the refresh interval
and the solver (the paper's code is not released; flowalign solves the small problem exactly).
"""
from __future__ import annotations

import itertools

import torch

#: rewards MARBLE balances at most (its exact solver tries every support)
MAX_REWARDS = 10


def min_norm_weights(gram: torch.Tensor) -> torch.Tensor:
    """``argmin_{α in the simplex} αᵀ·gram·α``, exactly: the best feasible solution of the equality-constrained
    problem on each support (a handful of rewards: at most 2^K small solves; written here as no library of the
    stack solves it)."""
    gram = gram.double().cpu()
    k = gram.shape[0]
    if k > MAX_REWARDS:
        raise ValueError(f"reward.aggregate=marble balances at most {MAX_REWARDS} rewards, got {k}")
    best, best_value = None, float("inf")
    for support in itertools.chain.from_iterable(itertools.combinations(range(k), n) for n in range(1, k + 1)):
        idx = list(support)
        kkt = torch.ones(len(idx) + 1, len(idx) + 1, dtype=torch.float64)
        kkt[:-1, :-1], kkt[-1, -1] = gram[idx][:, idx], 0.0
        rhs = torch.zeros(len(idx) + 1, dtype=torch.float64)
        rhs[-1] = 1.0
        solution = torch.linalg.pinv(kkt) @ rhs  # the stationary point on this support (min-norm if singular)
        if bool((solution[:-1] < -1e-12).any()):
            continue
        alpha = torch.zeros(k, dtype=torch.float64)
        alpha[idx] = solution[:-1].clamp_min(0)
        alpha /= alpha.sum()
        value = float(alpha @ gram @ alpha)
        if value < best_value - 1e-15:
            best, best_value = alpha, value
    return best


class GradientBalance:
    """The smoothed weights ``ᾱ`` (starting at the rewards' normalised weights) and the last gradient norms."""

    def __init__(self, weights: dict[str, float], momentum: float, every: int):
        total = sum(weights.values())
        self.alpha = {k: w / total for k, w in weights.items()}
        self.norms = dict.fromkeys(weights, 1.0)
        self.momentum, self.every = momentum, every

    def due(self, iteration: int) -> bool:
        return iteration % self.every == 0

    def update(self, grads: dict[str, torch.Tensor]) -> dict[str, float]:
        """Refresh ``ᾱ`` from each reward's full gradient (flat); a reward whose gradient is 0 (no signal this
        iteration) takes no part in the min-norm problem. Returns α*."""
        norms = {k: float(g.norm()) for k, g in grads.items()}
        live = [k for k in grads if norms[k] > 0]
        star = dict.fromkeys(grads, 0.0)
        if live:
            unit = torch.stack([grads[k].double() / norms[k] for k in live])
            star.update(zip(live, min_norm_weights(unit @ unit.T).tolist()))
            self.norms.update({k: norms[k] for k in live})
        self.alpha = {k: self.momentum * self.alpha[k] + (1 - self.momentum) * star[k] for k in self.alpha}
        return star

    def coefficients(self) -> dict[str, float]:
        """``c_k = ᾱ_k·s/‖g_k‖`` with ``s = Σ_k ᾱ_k‖g_k‖``: the combined advantage's weights."""
        scale = sum(self.alpha[k] * self.norms[k] for k in self.alpha)
        return {k: self.alpha[k] * scale / self.norms[k] for k in self.alpha}

    def state(self) -> dict:
        return {"alpha": dict(self.alpha), "norms": dict(self.norms)}

    def load_state(self, state: dict) -> None:
        if state:
            self.alpha, self.norms = dict(state["alpha"]), dict(state["norms"])
