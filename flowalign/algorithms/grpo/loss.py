"""The clipped-ratio policy loss of the GRPO family (from ddpo-pytorch; docs/methods/flow_grpo.md)."""
from __future__ import annotations

import torch


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float | torch.Tensor, adv_clip: float = 5.0, weights: torch.Tensor | None = None,
                        log_ratio: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mean(max(-A·r, -A·clip(r, 1-ε, 1+ε)))`` with ``A`` clamped to ±adv_clip; returns the loss and its
    statistics (ratio mean/min/max, clip fraction) as tensors (read them off the device when logging).
    ``log_ratio`` replaces ``logp - old_logp`` (GRPO-Guard's normalised ratio); ``clip_range`` may be a
    per-sample tensor (dynamic clipping)."""
    adv = advantages.clamp(-adv_clip, adv_clip)
    ratio = torch.exp(logp - old_logp if log_ratio is None else log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_sample = per_sample * weights
    stats = {"ratio_mean": ratio.detach().mean(), "ratio_min": ratio.detach().min(),
             "ratio_max": ratio.detach().max(),
             "clip_fraction": ((ratio.detach() - 1).abs() > clip_range).float().mean()}
    return per_sample.mean(), stats


def guard_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mean: torch.Tensor, old_mean: torch.Tensor,
                    std: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                    scale: str = "per_sample") -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO-Guard's ratio normalisation (docs/methods/modifiers.md, implemented from the reference formula):
    ``b = mean((μ_θ - μ_old)²) / (2(g·sqrt(Δ))²)``, ``log r = (logp - logp_old + b)·sqrt(Δ)·g`` with ``g`` the
    step's diffusion coefficient and ``Δ = sqrt|Δσ|²``. Adding ``b`` centres the log-ratio (zero mean under the
    old policy) and the scaling puts every timestep on one scale. Returns ``log r`` and ``Δ``, by which the
    policy loss is divided. ``per_sample``: each sample's own step (the references batch one step at a time, so
    this is their result whatever the batching; ``Δ`` is then ``[B]``); ``batch``: ``Δ̄ = mean(sqrt|Δσ|)²``
    over the minibatch, which mixes steps when minibatches are shuffled."""
    sqrt_dt = (sigma - sigma_next).abs().sqrt()
    g = std / sqrt_dt.clamp_min(1e-12)
    delta_bar = sqrt_dt ** 2 if scale == "per_sample" else sqrt_dt.mean() ** 2
    sq = ((mean.float() - old_mean.float()) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    b = sq / (2 * (g ** 2 * delta_bar).clamp_min(1e-20))
    return (logp - old_logp + b) * delta_bar.sqrt() * g, delta_bar


def reward_conditioned_clip(advantages: torch.Tensor, low: float, high: float, eta: float) -> torch.Tensor:
    """Dynamic-TreeRPO's reward-conditioned clip bound, per sample, in ``[low, high]``: samples whose
    advantage is larger in magnitude may move further, ``low + (high - low)·tanh(η·|A|)``.
    Paper-approximate: the paper (Eq. 11) gives the bounds and a sensitivity factor η, not this exact form."""
    return low + (high - low) * torch.tanh(eta * advantages.abs())
