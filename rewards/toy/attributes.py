"""Measurable image attributes as differentiable rewards: ink (boldness), size, centring, symmetry.

Each works on RGB ``[B,3,H,W]`` in [0,1] at any size, treating bright pixels as ink. With ``target`` set,
the reward is ``-|attribute - target|`` (reach a value) instead of the attribute itself (more is better).
"""
from __future__ import annotations

import torch

from ..base import InputSpec, Reward


class AttributeReward(Reward):
    """Base for attribute rewards: subclasses define ``measure(ink) -> Tensor[B]``."""

    differentiable = True
    input_spec = InputSpec(range=(0.0, 1.0), layout="BCHW")

    def __init__(self, target: float | None = None):
        super().__init__()
        self.target = target

    def measure(self, ink: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _score(self, media, prompts, metadata):
        value = self.measure(media.mean(dim=1))
        return value if self.target is None else -(value - self.target).abs()


def _centroid_and_mass(ink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ink mass and centroid (in units of the half-size, centre at 0) plus coordinate grids."""
    h, w = ink.shape[-2:]
    ys = torch.linspace(-1, 1, h, device=ink.device, dtype=ink.dtype).view(1, h, 1)
    xs = torch.linspace(-1, 1, w, device=ink.device, dtype=ink.dtype).view(1, 1, w)
    mass = ink.sum(dim=(-2, -1)).clamp_min(1e-6)
    cy = (ink * ys).sum(dim=(-2, -1)) / mass
    cx = (ink * xs).sum(dim=(-2, -1)) / mass
    return mass, torch.stack([cy, cx], -1), ys, xs


class InkReward(AttributeReward):
    """Boldness: the mean ink per pixel (0 blank, 1 all ink)."""

    name = "toy/ink"

    def measure(self, ink):
        return ink.mean(dim=(-2, -1))


class SizeReward(AttributeReward):
    """Size: the ink-weighted RMS distance from the ink centroid, in half-image units (~0.3-0.6 for digits)."""

    name = "toy/size"

    def measure(self, ink):
        mass, c, ys, xs = _centroid_and_mass(ink)
        d2 = (ys - c[:, 0, None, None]) ** 2 + (xs - c[:, 1, None, None]) ** 2
        return ((ink * d2).sum(dim=(-2, -1)) / mass).sqrt()


class CenteredReward(AttributeReward):
    """Centring: 1 minus the distance of the ink centroid from the image centre (half-image units)."""

    name = "toy/centered"

    def measure(self, ink):
        _, c, _, _ = _centroid_and_mass(ink)
        return 1 - c.norm(dim=-1)


class SymmetryReward(AttributeReward):
    """Left-right mirror symmetry: 1 minus the mean absolute difference to the mirrored image."""

    name = "toy/symmetry"

    def measure(self, ink):
        return 1 - (ink - ink.flip(-1)).abs().mean(dim=(-2, -1))
