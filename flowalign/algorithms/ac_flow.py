"""AC-Flow: a critic of intermediate states weighting the flow-matching loss (noise_critics_distributional.md §3).

The parts, each labelled where the paper leaves the exact form open (paper-approximate):

- **reward shaping**: ``r̃ = (r - mean)/(std + eps)`` over the batch or per prompt group, optionally bounded
  (``tanh`` or clipped to ±c);
- **critic** ``V_φ(x_σ, σ, c)``: a small CNN over the latent grid plus an MLP head fed with a σ embedding and
  the pooled text embedding; it regresses ``r̃`` of the clean sample behind each noisy state;
- **advantage** ``A = clip(r̃ - V_φ(x_σ, σ, c), ±ε_A)`` per (sample, σ): at high noise the critic knows little
  and the advantage is the reward against the prompt's typical one; near the data it credits little;
- **actor**: ``E[w(A)·||v_θ(x_σ) - (ε - x0)||²] + α·E||v_θ(x_σ) - v_ref(x_σ)||²`` with ``w = exp(β·A)``
  (optionally divided by its batch mean); the second term bounds W2 to the frozen base (the LoRA-off model);
- **warm-up**: the first iterations train the critic only.

ORW-CFM-W2 is the special case without a critic: ``A = r`` (raw), no clipping, ``w = exp(β·r)``.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def pooled_text(embeds: dict[str, torch.Tensor]) -> torch.Tensor:
    """One vector per prompt from an adapter's conditioning: its pooled embedding, else the token mean."""
    for name in ("pooled", "pooled_prompt_embeds", "text_embeds"):
        if name in embeds:
            return embeds[name].float().flatten(1)
    tokens = next(v for v in embeds.values() if v.ndim == 3)
    return tokens.float().mean(dim=1)


def sigma_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of ``1000·σ`` (the transformers' timestep scale)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=sigma.device) / half)
    angles = 1000 * sigma.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Critic(nn.Module):
    """``V(x_σ, σ, c)`` on any latent layout: leading dims fold into channels (video ``[C,F,H,W]`` ->
    ``[C·F,H,W]``), a 1-D latent (audio ``[C,L]``) becomes ``[C,1,L]``."""

    def __init__(self, latent_shape: tuple[int, ...], text_dim: int, width: int = 32):
        super().__init__()
        channels = latent_shape[0] if len(latent_shape) == 2 else math.prod(latent_shape[:-2])
        self.width = width
        self.trunk = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU())
        self.text = nn.Linear(text_dim, width)
        self.head = nn.Sequential(nn.LayerNorm(4 * width), nn.Linear(4 * width, 2 * width), nn.SiLU(),
                                  nn.Linear(2 * width, 1))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x.unsqueeze(-2) if x.ndim == 3 else x.flatten(1, -3)
        features = torch.cat([self.trunk(x), self.time(sigma_embedding(sigma, self.width)), self.text(text.float())], 1)
        return self.head(features).squeeze(1)


def shape_rewards(rewards: torch.Tensor, groups: torch.Tensor | None = None, bound: str = "none",
                  bound_value: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """``(r - mean)/(std + eps)`` over the batch (``groups`` None) or within each group; then ``none``,
    ``tanh`` (``c·tanh(r̃/c)``) or ``clip`` (to ±c)."""
    if groups is None:
        shaped = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)
    else:
        shaped = torch.empty_like(rewards)
        for g in groups.unique():
            rows = groups == g
            shaped[rows] = (rewards[rows] - rewards[rows].mean()) / (rewards[rows].std(unbiased=False) + eps)
    if bound == "tanh":
        return bound_value * torch.tanh(shaped / bound_value)
    if bound == "clip":
        return shaped.clamp(-bound_value, bound_value)
    if bound != "none":
        raise ValueError(f"reward bound: expected none, tanh or clip, got {bound!r}")
    return shaped


def clipped_advantages(shaped: torch.Tensor, values: torch.Tensor | None, clip: float) -> torch.Tensor:
    """``clip(r̃ - V, ±clip)`` (no critic: ``r̃`` itself; ``clip`` 0: unclipped)."""
    adv = shaped if values is None else shaped - values.detach()
    return adv.clamp(-clip, clip) if clip > 0 else adv


def advantage_weights(adv: torch.Tensor, beta: float, normalize: bool) -> torch.Tensor:
    """``exp(β·A)``, divided by its batch mean when ``normalize`` (keeps the loss scale fixed)."""
    w = torch.exp(beta * (adv - adv.max()) if normalize else beta * adv)
    return w / w.mean() if normalize else w


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def explained_variance(values: torch.Tensor, targets: torch.Tensor) -> float:
    """``1 - Var(target - V)/Var(target)``: 1 is a perfect critic, 0 one that predicts the mean."""
    var = targets.var(unbiased=False)
    return float(1 - (targets - values).var(unbiased=False) / var) if var > 0 else 0.0
