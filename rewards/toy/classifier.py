"""The toy digit classifier (a small CNN on 16x16 digits) and the rewards it judges with."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..base import InputSpec, Reward
from . import WEIGHTS
from .digits import target_digits
from .saved_model import SavedModel

#: Classifiers trained with seeds 1..MEMBERS besides the shipped one (seed 0), for reward-ensemble demos.
MEMBERS = 3


class DigitClassifier(SavedModel):
    """Grey images ``[B,1,16,16]`` in [-1,1] -> logits over the ten digits."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.config = dict(width=width)
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * width * 16, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def to_grey(images: torch.Tensor) -> torch.Tensor:
    """RGB ``[B,3,H,W]`` in [0,1] -> the classifier's grey ``[B,1,16,16]`` in [-1,1]."""
    grey = images.mean(dim=1, keepdim=True)
    if grey.shape[-2:] != (16, 16):
        grey = torch.nn.functional.interpolate(grey, size=(16, 16), mode="bilinear", antialias=True)
    return grey * 2 - 1


def ink_crop(images: torch.Tensor, fraction: float) -> torch.Tensor:
    """RGB ``[B,3,H,W]`` -> the square ``fraction`` of each image centred on its ink centroid, resampled to
    16x16 (bilinear; differentiable in the pixels, the centroid is held fixed)."""
    with torch.no_grad():
        ink = images.mean(dim=1)
        h, w = ink.shape[-2:]
        ys = ((2 * torch.arange(h, device=ink.device, dtype=ink.dtype) + 1) / h - 1).view(h, 1)
        xs = ((2 * torch.arange(w, device=ink.device, dtype=ink.dtype) + 1) / w - 1).view(1, w)
        mass = ink.sum(dim=(-2, -1)).clamp_min(1e-6)
        cy, cx = (ink * ys).sum(dim=(-2, -1)) / mass, (ink * xs).sum(dim=(-2, -1)) / mass
    theta = torch.zeros(images.shape[0], 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = fraction
    theta[:, 0, 2], theta[:, 1, 2] = cx, cy
    grid = torch.nn.functional.affine_grid(theta, [images.shape[0], 3, 16, 16], align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


class DigitClassifierReward(Reward):
    """Probability the classifier gives to the prompted digit (differentiable).

    ``crop`` (a fraction of the frame) first crops around the ink centroid: 0.5 reads the 8x8 digit of a
    moving-digits video frame (16x16), which the classifier alone, trained on full-frame digits, cannot.
    ``member`` 1 to 3 judges with another classifier of the same architecture trained on the same digits with
    seed 1 to 3 (an ensemble's members; 0 is the shipped one)."""

    name = "toy/classifier"
    differentiable = True
    input_spec = InputSpec(range=(0.0, 1.0), layout="BCHW", size=(16, 16))

    def __init__(self, path: str | Path | None = None, crop: float | None = None, member: int = 0):
        super().__init__()
        if crop is not None and not 0 < crop <= 1:
            raise ValueError(f"{self.name}: crop must be a fraction in (0, 1], got {crop}")
        if member not in range(MEMBERS + 1) or (member and path):
            raise ValueError(f"{self.name}: member must be 0 to {MEMBERS} (and no path with a member), got {member}")
        path = path or (WEIGHTS / "classifier_members" / f"seed{member}" if member else WEIGHTS / "classifier")
        self.model = DigitClassifier.from_pretrained(path).requires_grad_(False)
        self.crop = crop

    def view(self, media: torch.Tensor) -> torch.Tensor:
        """What the classifier sees: the images, or their ink-centred crops."""
        return media if self.crop is None else ink_crop(media, self.crop)

    def _score(self, media, prompts, metadata):
        targets = torch.tensor(target_digits(prompts, metadata), device=media.device)
        probs = self.model(to_grey(self.view(media))).softmax(-1)
        return probs.gather(1, targets[:, None]).squeeze(1)


class DigitMatchReward(DigitClassifierReward):
    """1 when the classifier's top label is the prompted digit, else 0 (accuracy; not differentiable)."""

    name = "toy/digit_match"
    differentiable = False

    def _score(self, media, prompts, metadata):
        targets = torch.tensor(target_digits(prompts, metadata), device=media.device)
        return (self.model(to_grey(self.view(media))).argmax(-1) == targets).float()


class BoldDigitReward(DigitClassifierReward):
    """"Bold digits": the classifier's probability of the prompted digit times the mean ink, saturating at
    ``target_ink`` (``P · min(ink / target_ink, 1)``).

    The shipped model draws the right digit almost always but with thin strokes (mean ink ~0.3), so the
    reward grows only by drawing bolder while staying the prompted digit; the cap removes the incentive
    to flood the frame with ink (a classic reward hack of the uncapped product)."""

    name = "toy/bold_digit"

    def __init__(self, path=None, target_ink: float = 0.45, crop: float | None = None, member: int = 0):
        super().__init__(path, crop, member)
        self.target_ink = target_ink

    def _score(self, media, prompts, metadata):
        ink = self.view(media).mean(dim=(1, 2, 3))
        return super()._score(media, prompts, metadata) * (ink / self.target_ink).clamp(max=1.0)
