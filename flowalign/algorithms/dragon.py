"""DRAGON: distributional rewards through on-policy positive / negative sets (noise_critics_distributional.md §4).

One iteration generates two (or more) samples per prompt, scores them with any reward kind, splits them
into a positive set D+ and a negative set D-, and moves the model toward D+ and away from D- with a
preference loss on the flow-matching error relative to the frozen reference (the LoRA-off model):
``ℓ(x) = ||v_θ(x_σ) - (ε - x0)||² - ||v_ref(x_σ) - (ε - x0)||²`` (lower: the policy explains x better than
the reference does).

- instance rewards (aesthetics, CLAP score, per-sample FAD to exemplars): ``paired`` (best vs worst of each
  prompt's samples) or ``unpaired`` (above / below the batch median);
- set rewards (dataset FAD, Vendi): ``greedy`` swaps of each prompt's pair between two sets while that
  raises the set reward of D+ (paper-approximate: the paper's Algorithm 1 leaves the search open);
- losses: Diffusion-DPO on pairs, ``-log σ(-β·(ℓ(x_w) - ℓ(x_l)))``, and Diffusion-KTO on unpaired sets,
  ``1 - σ(β·(h - z_ref))`` on D+ and ``1 - σ(β·(z_ref - h))`` on D-, ``h = -ℓ``, ``z_ref`` the batch mean of
  ``h`` clamped at 0 and detached (the KL-baseline form; paper-approximate).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def paired_sets(rewards: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group: the best sample (winner) and the worst (loser); groups whose samples tie are dropped."""
    winners, losers = [], []
    for g in groups.unique():
        rows = torch.nonzero(groups == g).squeeze(1)
        values = rewards[rows]
        if rows.numel() >= 2 and values.max() > values.min():
            winners.append(rows[values.argmax()])
            losers.append(rows[values.argmin()])
    if not winners:
        empty = torch.zeros(0, dtype=torch.long, device=rewards.device)
        return empty, empty
    return torch.stack(winners), torch.stack(losers)


def unpaired_sets(rewards: torch.Tensor) -> torch.Tensor:
    """True for D+ (strictly above the batch median), False for D- (at or below it)."""
    return rewards > rewards.median()


def greedy_set_swaps(set_reward: Callable[[torch.Tensor], float], pairs: torch.Tensor,
                     passes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Distribution rewards: ``pairs[i]`` holds two sample indices of prompt i; start with D+ = the firsts,
    D- = the seconds, and swap a pair's members whenever that raises ``set_reward(D+)`` (indices in, higher
    is better). Returns (D+ indices, D- indices), aligned pair by pair."""
    positive, negative = pairs[:, 0].clone(), pairs[:, 1].clone()
    best = set_reward(positive)
    for _ in range(passes):
        improved = False
        for i in range(len(pairs)):
            positive[i], negative[i] = negative[i].clone(), positive[i].clone()
            score = set_reward(positive)
            if score > best:
                best, improved = score, True
            else:
                positive[i], negative[i] = negative[i].clone(), positive[i].clone()
        if not improved:
            break
    return positive, negative


def relative_errors(v: torch.Tensor, v_ref: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``ℓ = mse(v_θ, u) - mse(v_ref, u)`` per sample (fp32)."""
    mse = lambda a: (a.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # noqa: E731
    return mse(v) - mse(v_ref)


def dpo_loss(errors_win: torch.Tensor, errors_lose: torch.Tensor, beta: float) -> torch.Tensor:
    """Diffusion-DPO for flow matching: ``-log σ(-β·(ℓ_w - ℓ_l))``, averaged over pairs."""
    return -F.logsigmoid(-beta * (errors_win - errors_lose)).mean()


def kto_loss(errors: torch.Tensor, positive: torch.Tensor, beta: float) -> torch.Tensor:
    """Diffusion-KTO for flow matching on unpaired D+ (``positive``) and D- samples."""
    h = -errors
    z_ref = h.detach().mean().clamp(min=0)
    value = torch.where(positive, torch.sigmoid(beta * (h - z_ref)), torch.sigmoid(beta * (z_ref - h)))
    return (1 - value).mean()
