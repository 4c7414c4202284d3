"""The clipped-ratio policy loss of the GRPO family (from ddpo-pytorch; grpo_family.md §0)."""
from __future__ import annotations

import torch


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float, adv_clip: float = 5.0,
                        weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mean(max(-A·r, -A·clip(r, 1-ε, 1+ε)))`` with ``A`` clamped to ±adv_clip; returns the loss and its
    statistics (ratio mean/min/max, clip fraction) as tensors (read them off the device when logging)."""
    adv = advantages.clamp(-adv_clip, adv_clip)
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_sample = per_sample * weights
    stats = {"ratio_mean": ratio.detach().mean(), "ratio_min": ratio.detach().min(),
             "ratio_max": ratio.detach().max(),
             "clip_fraction": ((ratio.detach() - 1).abs() > clip_range).float().mean()}
    return per_sample.mean(), stats
