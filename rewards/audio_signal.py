"""Signal-level audio rewards that need no model: loudness (RMS level in dB).

Takes audio ``[B,C,L]`` in [-1,1]; differentiable with respect to the waveform.
"""
from __future__ import annotations

import torch

from .base import InputSpec, Reward


class LoudnessReward(Reward):
    """RMS level in dBFS over all channels and samples (0 dB: full-scale square wave; silence -> ``floor_db``).

    With ``target_db`` set, the reward is ``-|level - target_db|`` (reach a level) instead of the level itself."""

    name = "audio/loudness"
    modality = "audio"
    differentiable = True
    input_spec = InputSpec(range=(-1.0, 1.0), layout="BCL")

    def __init__(self, target_db: float | None = None, floor_db: float = -100.0):
        super().__init__()
        self.target_db, self.floor_db = target_db, floor_db

    def level_db(self, audio: torch.Tensor) -> torch.Tensor:
        """``10·log10(mean x²)``, floored (the floor keeps silence finite and its gradient defined)."""
        power = audio.float().pow(2).mean(dim=(1, 2))
        return 10.0 * torch.log10(power.clamp_min(10 ** (self.floor_db / 10)))

    def _score(self, media, prompts, metadata):
        level = self.level_db(media)
        return level if self.target_db is None else -(level - self.target_db).abs()
