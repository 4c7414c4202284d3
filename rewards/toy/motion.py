"""Motion rewards for the moving-digits video: does the ink centroid travel the prompted way, far enough, evenly.

Both take video ``[B,F,3,H,W]`` in [0,1] (bright = ink); the direction comes from ``metadata["direction"]``
or the prompt ("a seven moving to the right", "the digit 3 sliding up").
"""
from __future__ import annotations

import re

import torch

from ..base import InputSpec, Reward
from ..errors import RewardError

#: Direction -> unit step ``(dy, dx)`` in image coordinates (y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {"right": (0, 1), "left": (0, -1), "up": (-1, 0), "down": (1, 0)}
_WORDS = {w: d for d in DIRECTIONS for w in (d, d + "ward", d + "wards")}


def parse_direction(prompt: str) -> str | None:
    """The direction a prompt asks for ("moving to the right", "sliding upwards"), or None."""
    for token in re.findall(r"[a-z]+", prompt.lower()):
        if token in _WORDS:
            return _WORDS[token]
    return None


def target_directions(prompts: list[str], metadata: list[dict]) -> list[str]:
    """Each sample's direction: ``metadata["direction"]`` if given, else parsed from the prompt."""
    out = []
    for prompt, meta in zip(prompts, metadata):
        direction = meta.get("direction", parse_direction(prompt))
        if direction not in DIRECTIONS:
            raise RewardError(f"toy motion reward: prompt {prompt!r} names no direction (left/right/up/down) "
                              "and metadata has no 'direction'")
        out.append(direction)
    return out


def ink_centroids(video: torch.Tensor) -> torch.Tensor:
    """Video ``[B,F,3,H,W]`` -> each frame's ink centroid ``[B,F,2]`` as (y, x) in frame widths (0..1)."""
    ink = video.mean(dim=2)
    h, w = ink.shape[-2:]
    ys = torch.arange(h, device=ink.device, dtype=ink.dtype).view(h, 1) / w
    xs = torch.arange(w, device=ink.device, dtype=ink.dtype).view(1, w) / w
    mass = ink.sum(dim=(-2, -1)).clamp_min(1e-6)
    return torch.stack([(ink * ys).sum(dim=(-2, -1)) / mass, (ink * xs).sum(dim=(-2, -1)) / mass], dim=-1)


def _unit(directions: list[str], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([DIRECTIONS[d] for d in directions], device=like.device, dtype=like.dtype)


class MotionReward(Reward):
    """``min(along / step, 1) - (|across| + unevenness) / step``, from the per-frame centroid steps: ``along``
    is the mean step in the prompted direction (capped at ``step``, so racing earns nothing), ``across`` the
    mean sideways drift, ``unevenness`` the mean distance of each step from the mean step. 1 for a clip
    that slides ``step`` frame widths a frame in a straight line; differentiable."""

    name = "toy/motion"
    modality = "video"
    differentiable = True
    input_spec = InputSpec(range=(0.0, 1.0), layout="BFCHW")

    def __init__(self, step: float = 0.125):
        super().__init__()
        if step <= 0:
            raise ValueError(f"toy/motion: step must be > 0, got {step}")
        self.step = step

    def _score(self, media, prompts, metadata):
        if media.shape[1] < 2:
            raise RewardError(f"reward {self.name}: needs at least 2 frames, got {media.shape[1]}")
        u = _unit(target_directions(prompts, metadata), media)  # [B,2]
        steps = ink_centroids(media).diff(dim=1)  # [B,F-1,2]
        along = (steps * u[:, None]).sum(-1).mean(1)
        across = (steps * u.flip(-1)[:, None]).sum(-1).mean(1).abs()
        uneven = (steps - steps.mean(1, keepdim=True)).norm(dim=-1).mean(1)
        return (along / self.step).clamp(max=1.0) - (across + uneven) / self.step


class MotionMatchReward(Reward):
    """1 when the clip's net centroid move (last frame minus first) points the prompted way, i.e. its larger
    component is along the prompted axis with the prompted sign, else 0 (direction accuracy)."""

    name = "toy/motion_match"
    modality = "video"
    input_spec = InputSpec(range=(0.0, 1.0), layout="BFCHW")

    def _score(self, media, prompts, metadata):
        u = _unit(target_directions(prompts, metadata), media)
        c = ink_centroids(media)
        move = c[:, -1] - c[:, 0]
        return ((move * u).sum(-1) > (move * u.flip(-1)).sum(-1).abs()).float()
