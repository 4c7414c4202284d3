"""Exemplar sets of the music world, for DRAGON's distributional rewards: rendered real melodies, made on the
fly from a style description ("ascending scales in C major"), and the set rewards built on them with the
toy spectral encoder (``toy/music_fad``, ``toy/music_exemplar``, ``toy/music_vendi``)."""
from __future__ import annotations

import torch

from ..distributional import ExemplarReward, FrechetReward, VendiReward
from .melody import Melody, parse_melody, random_melodies, render
from .music import ToyMusicEncoder


def style_melody(style: str) -> Melody:
    """The fields a style names (key, pattern, tempo); "" leaves all open. A style naming none is an error."""
    melody = parse_melody(style)
    if style.strip() and melody == Melody():
        raise ValueError(f"toy music style {style!r}: names no key ('C major'), pattern ('ascending', 'arpeggio', "
                         "...) or tempo ('slow', 'fast')")
    return melody


def exemplar_rolls(style: str = "", n: int = 64, seed: int = 0) -> torch.Tensor:
    """``n`` seeded piano rolls ``[n, 24, 32]`` of the style; what it leaves open is drawn at random."""
    return random_melodies(n, seed, style_melody(style))[1]


def exemplar_set(style: str = "", n: int = 64, seed: int = 0) -> torch.Tensor:
    """``n`` seeded real melodies of the style as waveforms ``[n, 1, 16000]`` (8 kHz, 2 s)."""
    return render(exemplar_rolls(style, n, seed))


def music_fad(style: str = "", n: int = 64, seed: int = 0) -> FrechetReward:
    """Negative Fréchet audio distance (toy encoder) to the style's exemplar set."""
    reward = FrechetReward(ToyMusicEncoder(), reference=exemplar_set(style, n, seed))
    reward.name = "toy/music_fad"
    return reward


def music_exemplar(style: str = "", n: int = 64, seed: int = 0, reduce: str = "mean") -> ExemplarReward:
    """Cosine similarity (toy encoder) to the style's exemplar set."""
    reward = ExemplarReward(ToyMusicEncoder(), exemplars=exemplar_set(style, n, seed), reduce=reduce)
    reward.name = "toy/music_exemplar"
    return reward


def music_vendi(q: float = 1.0) -> VendiReward:
    """Vendi diversity of a batch of clips (toy encoder)."""
    reward = VendiReward(ToyMusicEncoder(), q=q)
    reward.name = "toy/music_vendi"
    return reward


# what ``flowalign rewards list`` says of these factories (their classes' defaults are an image modality)
for _factory in (music_fad, music_exemplar, music_vendi):
    _factory.modality, _factory.loads = "audio", "the toy music encoder (no weights)"
