"""The music data: synthetic melodies (scales, arpeggios, repeated notes in five keys, slow or fast), as
piano rolls ``[24, 32]`` (pitch x frame, in [-1, 1]) and rendered 2 s waveforms at 8 kHz.

The symbols and the renderer live in ``rewards.toy.melody`` (the rewards use them and must not import
flowalign); this module draws the seeded training batches.
"""
from __future__ import annotations

import random

import torch

from ..rewards.toy.melody import (
    FRAMES,
    KEYS,
    LENGTH,
    PATTERNS,
    PITCHES,
    SAMPLE_RATE,
    TEMPOS,
    Melody,
    note_sequence,
    parse_melody,
    piano_roll,
    random_melodies,
    render,
)
from .music_prompts import random_caption

__all__ = ["FRAMES", "KEYS", "LENGTH", "PATTERNS", "PITCHES", "SAMPLE_RATE", "TEMPOS", "Melody", "note_sequence",
           "parse_melody", "piano_roll", "random_melodies", "render", "training_batch"]


def training_batch(n: int, seed: int, caption_dropout: float = 0.1) -> tuple[torch.Tensor, list[str]]:
    """``n`` random melodies as rolls ``[n, P, 1, T]`` (the generator's latent layout) with their captions
    (``""`` with prob. ``caption_dropout``, the unconditional branch for CFG); all follows from ``seed``."""
    melodies, rolls = random_melodies(n, seed)
    rng = random.Random(seed + 1)
    captions = ["" if rng.random() < caption_dropout else random_caption(m, rng) for m in melodies]
    return rolls.unsqueeze(2), captions
