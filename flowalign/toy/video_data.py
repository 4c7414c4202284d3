"""The moving-digits data: a native 8x8 scikit-learn digit sliding across a 16x16 frame, 4 frames, in [-1,1].

The digit moves ``STEP`` pixels a frame in one of four directions, along the frame's middle (within
``JITTER`` pixels across it) from a random start where the whole path fits, so one clip is fully set by
(digit image, direction, two offsets), all drawn from a seeded ``torch.Generator``.
"""
from __future__ import annotations

import torch

from ..rewards.toy.motion import DIRECTIONS
from .data import load_digits

FRAMES = 4
FRAME_SIZE = 16
DIGIT_SIZE = 8
STEP = 2  # pixels per frame
JITTER = 1  # pixels off the middle line, across the motion
#: How far the path leaves the digit free to start along its axis.
SLACK = FRAME_SIZE - DIGIT_SIZE - (FRAMES - 1) * STEP

__all__ = ["DIRECTIONS", "FRAMES", "FRAME_SIZE", "STEP", "load_moving_digits", "render_videos"]


def render_videos(digits: torch.Tensor, directions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Digits ``[N,1,8,8]`` in [-1,1] and direction indices ``[N]`` (into ``DIRECTIONS``) -> clips ``[N,1,F,16,16]``."""
    n = digits.shape[0]
    start = torch.randint(0, SLACK + 1, (n,), generator=generator)
    middle = (FRAME_SIZE - DIGIT_SIZE) // 2
    across = torch.randint(middle - JITTER, middle + JITTER + 1, (n,), generator=generator)
    videos = torch.full((n, 1, FRAMES, FRAME_SIZE, FRAME_SIZE), -1.0)
    for i in range(n):
        dy, dx = DIRECTIONS[list(DIRECTIONS)[int(directions[i])]]
        for t in range(FRAMES):
            along = int(start[i]) + t * STEP
            along = along if dx + dy > 0 else FRAME_SIZE - DIGIT_SIZE - along  # left / up start at the far side
            y, x = (along, int(across[i])) if dy else (int(across[i]), along)
            videos[i, 0, t, y:y + DIGIT_SIZE, x:x + DIGIT_SIZE] = digits[i, 0]
    return videos


def load_moving_digits(split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One clip per digit of the split: videos ``[N,1,F,16,16]``, labels ``[N]``, direction indices ``[N]``
    (directions balanced, deterministic from ``seed``)."""
    digits, labels = load_digits(split, size=DIGIT_SIZE)
    gen = torch.Generator().manual_seed(seed)
    directions = torch.arange(len(labels)) % len(DIRECTIONS)
    directions = directions[torch.randperm(len(labels), generator=gen)]
    return render_videos(digits, directions, gen), labels, directions
