"""The toy pairwise preference model: a Bradley-Terry judge, ``P(a ≻ b) = σ(f(a) - f(b))``.

Trained by the project (``flowalign.toy.train_preference``) on pairs of digits whose preference comes
from measurable attributes (the bolder and better centred digit wins), so Pref-GRPO's pairwise path has
a judge that knows something real, while only ever answering pairwise questions.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..base import InputSpec, PairwiseReward
from . import WEIGHTS
from .classifier import to_grey
from .saved_model import SavedModel


class PreferenceNet(SavedModel):
    """Grey ``[B,1,16,16]`` in [-1,1] -> a scalar utility per image."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.config = dict(width=width)
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(2 * width * 16, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).squeeze(-1)


class ToyPreference(PairwiseReward):
    """``toy/preference``: which of two digits a judge prefers (bolder and better centred wins)."""

    name = "toy/preference"
    differentiable = True
    input_spec = InputSpec(range=(0.0, 1.0), layout="BCHW", size=(16, 16))

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        self.model = PreferenceNet.from_pretrained(path or WEIGHTS / "preference").requires_grad_(False)

    def _prefer(self, a, b, prompts):
        return torch.sigmoid(self.model(to_grey(a)) - self.model(to_grey(b)))
