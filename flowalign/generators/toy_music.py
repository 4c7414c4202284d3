"""The toy music generator: a tiny SD3 transformer on a piano roll, decoded by additive-sine rendering.

The "latent" is the piano roll itself, laid out ``[24, 1, 32]`` = (semitone A3..G#5 as channels, a height
of 1, 62.5 ms frames), in [-1, 1] (-1 silence, a note its velocity mapped to [0.2, 1]); the transformer
(patch 1) sees one token per frame. ``decode`` renders it to a 2 s waveform ``[B, 1, 16000]`` at 8 kHz
in [-1, 1], differentiably, so audio rewards backpropagate to the latent.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..rewards.toy.melody import FRAMES, PITCHES, SAMPLE_RATE, render
from .toy_digits import ToyDigitsGenerator

SHIPPED = Path(__file__).resolve().parent.parent / "toy" / "weights" / "music"
#: Written beside the model by the build: marks a folder as a toy music model (``load_generator`` looks for it).
MARKER = "toy_music.json"


class ToyMusicGenerator(ToyDigitsGenerator):
    """Rectified flow on synthetic melodies: the digits model's code with a piano-roll latent and audio out."""

    modality = "audio"
    toy_world = "music"  # the trainer's prompts and held-out evaluation prompts come from this world
    sample_rate = SAMPLE_RATE
    default_steps = 20
    default_guidance = 3.0

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (PITCHES, 1, FRAMES)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Piano rolls ``[B,24,1,32]`` -> mono waveforms ``[B,1,16000]`` in [-1,1] at ``sample_rate`` Hz."""
        return render(x.float().squeeze(2))
