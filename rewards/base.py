"""The reward protocol (DESIGN.md): pointwise rewards score media for prompts, one number per sample.

Batching, device and dtype are handled here once, not in every plug-in: a subclass implements
``_score`` on a chunk that is already on its device and in its dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class InputSpec:
    """What a reward expects: value range, tensor layout, and a preferred size (None: any)."""

    range: tuple[float, float] = (0.0, 1.0)
    layout: str = "BCHW"
    size: tuple[int, ...] | None = None


class Reward(nn.Module):
    """A pointwise reward: ``score(media, prompts, metadata) -> Tensor[B]`` (higher is better)."""

    name: str = "reward"
    modality: Literal["image", "video", "audio"] = "image"
    differentiable: bool = False
    input_spec: InputSpec = InputSpec()
    #: Samples per forward pass; a long batch is cut into chunks of this size.
    batch_size: int = 64

    def _score(self, media: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        raise NotImplementedError

    def score(self, media: torch.Tensor, prompts: list[str] | None = None,
              metadata: list[dict] | None = None) -> torch.Tensor:
        """Score a batch; gradients flow to ``media`` when the reward is differentiable."""
        n = media.shape[0]
        prompts = list(prompts) if prompts is not None else [""] * n
        metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
        if len(prompts) != n or len(metadata) != n:
            raise ValueError(f"reward {self.name}: {n} samples but {len(prompts)} prompts, {len(metadata)} metadata")
        param = next(self.parameters(), None)
        device = param.device if param is not None else media.device
        dtype = param.dtype if param is not None and param.is_floating_point() else media.dtype
        grad = torch.enable_grad() if self.differentiable and media.requires_grad else torch.no_grad()
        with grad:
            chunks = [self._score(media[i:i + self.batch_size].to(device, dtype), prompts[i:i + self.batch_size],
                                  metadata[i:i + self.batch_size]) for i in range(0, n, self.batch_size)]
        return torch.cat(chunks).float().to(media.device)

    def forward(self, media: torch.Tensor, prompts: list[str] | None = None,
                metadata: list[dict] | None = None) -> torch.Tensor:
        return self.score(media, prompts, metadata)


class CompositeReward(Reward):
    """A weighted sum of rewards (each may be normalised first by the caller)."""

    def __init__(self, rewards: dict[str, Reward], weights: dict[str, float]):
        super().__init__()
        self.parts = nn.ModuleDict(rewards)
        self.weights = dict(weights)
        self.name = "+".join(f"{w:g}*{k}" for k, w in self.weights.items())
        self.differentiable = all(r.differentiable for r in rewards.values())
        self.modality = next(iter(rewards.values())).modality

    def score_all(self, media: torch.Tensor, prompts: list[str] | None = None,
                  metadata: list[dict] | None = None) -> dict[str, torch.Tensor]:
        """Every part's score, by name (for logging)."""
        return {k: r.score(media, prompts, metadata) for k, r in self.parts.items()}

    def score(self, media, prompts=None, metadata=None) -> torch.Tensor:
        scores = self.score_all(media, prompts, metadata)
        return sum(self.weights[k] * s for k, s in scores.items())
