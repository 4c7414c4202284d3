"""Toy audio rewards for the music world: pitch accuracy, key, tempo, and a spectral encoder for set rewards.

All work on mono 8 kHz waveforms ``[B,C,L]`` in [-1, 1] (channels are averaged) and start from one analysis:
the STFT power folded onto semitone bins (MIDI 45..96, wider than the generator's grid, so energy off the
grid still counts). Differentiable: ``toy/pitch``, ``toy/key`` and the encoder. Not differentiable:
``toy/pitch_accuracy`` (an argmax per note) and ``toy/tempo`` (counts onsets).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..base import InputSpec, Reward
from .melody import (
    FRAMES,
    GAIN,
    LOWEST,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    TEMPOS,
    Melody,
    key_pitch_classes,
    midi_to_hz,
    note_sequence,
    note_spans,
    target_melodies,
)

LOW, HIGH = 45, 96  # MIDI range of the analysis
HOP = SAMPLES_PER_FRAME // 2  # two analysis frames per grid frame
SHORT, LONG = 512, 2048  # windows: 64 ms (notes, onsets) and 256 ms (key: separates the grid's semitones)
SILENCE = 0.02  # pitch energy of a note below this (a full-velocity note peaks near 1) counts as silence
ONSET_COMPRESSION = 10.0

_FILTERS: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def _semitone_filters(n_fft: int, device, dtype) -> torch.Tensor:
    """``[n_fft//2+1, P]`` triangles in log-frequency, one per semitone (weight 1 at the pitch, 0 half a
    semitone away, so neighbours barely share a tone)."""
    key = (n_fft, str(device), dtype)
    if key not in _FILTERS:
        freqs = torch.linspace(0, SAMPLE_RATE / 2, n_fft // 2 + 1, dtype=torch.float64).clamp_min(1.0)
        centres = midi_to_hz(torch.arange(LOW, HIGH + 1)).double()
        distance = (12 * torch.log2(freqs[:, None] / centres[None])).abs()
        _FILTERS[key] = (1 - 2 * distance).clamp_min(0).to(device, dtype)
    return _FILTERS[key]


def pitch_energy(wave: torch.Tensor, window: int = SHORT) -> torch.Tensor:
    """Waveforms ``[B,C,L]`` -> energy per semitone and frame ``[B, P, T]`` (P = MIDI 45..96, hop 31.25 ms),
    in units of a full-gain sine's STFT peak (``(GAIN * window / 4)²``), so a loud note is of order 1."""
    mono = wave.mean(1) if wave.ndim == 3 else wave
    n_fft = max(window, 1024)
    spec = torch.stft(mono.float(), n_fft, HOP, win_length=window, window=torch.hann_window(window, device=mono.device),
                      center=True, pad_mode="constant", return_complex=True)
    power = torch.view_as_real(spec).pow(2).sum(-1)  # [B, F, T]; not |z|, whose gradient is NaN at 0
    energy = torch.einsum("bft,fp->bpt", power, _semitone_filters(n_fft, mono.device, power.dtype))
    return energy / (GAIN * window / 4) ** 2


def note_frames(start: int, end: int) -> slice:
    """The analysis frames whose window centre lies inside grid frames ``[start, end)``, past the onset."""
    return slice(2 * start + 1, 2 * end)


def onset_envelope(energy: torch.Tensor) -> torch.Tensor:
    """Spectral flux ``[B, T]``: the summed rise of log-compressed semitone energies over the previous
    frame's maximum of each semitone and its neighbours (SuperFlux: a note's end, which smears its energy
    onto the neighbours, is no onset); the clip starts from silence, so a note at the very start counts."""
    log_e = torch.log1p(ONSET_COMPRESSION * energy)
    previous = F.pad(log_e, (1, 0))[..., :-1]
    previous = F.max_pool1d(previous.transpose(1, 2), 3, stride=1, padding=1).transpose(1, 2)
    return F.relu(log_e - previous).sum(1)


def _tempos(melody: Melody) -> list[str]:
    return [melody.tempo] if melody.tempo is not None else list(TEMPOS)


class MusicReward(Reward):
    """Shared by the toy music rewards: audio in [-1, 1], layout ``[B,C,L]``, 8 kHz."""

    modality = "audio"
    input_spec = InputSpec(range=(-1.0, 1.0), layout="BCL")


class PitchAccuracyReward(MusicReward):
    """Fraction of the prompt's notes whose dominant pitch (over the note's span) is the intended one.

    The prompt names the key and pattern (and maybe the tempo); the intended notes follow from them
    (``melody.note_sequence``). With no tempo named, the better of the two tempos counts. Not differentiable."""

    name = "toy/pitch_accuracy"

    def _per_note(self, energy: torch.Tensor, melody: Melody, tempo: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per note: summed energies ``[P, N]`` over its span and the intended pitch index ``[N]``."""
        full = Melody(melody.key, melody.pattern, tempo)
        sums = torch.stack([energy[:, note_frames(s, e)].sum(-1) for s, e in note_spans(tempo)], -1)
        targets = torch.tensor([p - LOW for p in note_sequence(full)], device=energy.device)
        return sums, targets

    def _note_scores(self, sums: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        best = sums.max(0)
        return ((best.indices == targets) & (best.values > SILENCE)).float()

    def _score(self, media, prompts, metadata):
        melodies = target_melodies(prompts, metadata, ("key", "pattern"), self.name)
        energy = pitch_energy(media)
        scores = []
        for i, melody in enumerate(melodies):
            per_tempo = [self._note_scores(*self._per_note(energy[i], melody, t)).mean() for t in _tempos(melody)]
            scores.append(torch.stack(per_tempo).max())
        return torch.stack(scores)


class PitchReward(PitchAccuracyReward):
    """The soft, differentiable form of pitch accuracy: per note, the intended pitch's share of the note's
    energy (silence scores 0), averaged over notes."""

    name = "toy/pitch"
    differentiable = True

    def _note_scores(self, sums, targets):
        return sums.gather(0, targets[None]).squeeze(0) / (sums.sum(0) + SILENCE)


class KeyReward(MusicReward):
    """Fraction of the clip's pitched energy in the prompt's key (its seven pitch classes); silence scores 0.
    Relative keys (C major / A minor) share their pitch classes and so score alike. Differentiable."""

    name = "toy/key"
    differentiable = True

    def _score(self, media, prompts, metadata):
        melodies = target_melodies(prompts, metadata, ("key",), self.name)
        per_pitch = pitch_energy(media, LONG).sum(-1)  # [B, P]
        masks = torch.zeros(len(melodies), per_pitch.shape[1], device=media.device, dtype=per_pitch.dtype)
        for i, melody in enumerate(melodies):
            classes = set(key_pitch_classes(melody.key))
            masks[i] = torch.tensor([float(m % 12 in classes) for m in range(LOW, HIGH + 1)])
        return (per_pitch * masks).sum(-1) / (per_pitch.sum(-1) + SILENCE)


def count_onsets(wave: torch.Tensor, relative: float = 0.2) -> torch.Tensor:
    """Onsets per clip ``[B]``: local maxima of the spectral flux above ``relative`` x its clip maximum
    (and above an absolute floor, so silence has none)."""
    flux = onset_envelope(pitch_energy(wave))
    padded = F.pad(flux, (1, 1))
    peak = (flux > padded[:, :-2]) & (flux >= padded[:, 2:])
    floor = torch.maximum(relative * flux.max(-1, keepdim=True).values, torch.full_like(flux[:, :1], 0.1))
    return (peak & (flux > floor)).sum(-1)


class TempoReward(MusicReward):
    """How close the onset rate is to the prompt's tempo (4 notes/s slow, 8 fast): ``-|log2(rate/target)|``,
    0 at the right rate, -1 at double or half. Counts onsets, so not differentiable."""

    name = "toy/tempo"

    def _score(self, media, prompts, metadata):
        melodies = target_melodies(prompts, metadata, ("tempo",), self.name)
        rate = count_onsets(media).float() / (media.shape[-1] / SAMPLE_RATE)
        target = torch.tensor([float(TEMPOS[m.tempo]) for m in melodies], device=media.device)
        return -(torch.log2(rate.clamp_min(0.5) / target)).abs()


class ToyMusicEncoder(nn.Module):
    """A fixed spectral embedding of a clip ``[B,C,L] -> [B,26]`` for FAD, Vendi and exemplar rewards.

    Loudness (mean, std of log frame energy), chroma (12 pitch-class shares), the pitch contour (energy
    centroid in octaves over 8 segments: rising vs falling), and rhythm (onset-flux mean and std and its
    autocorrelation at the fast and slow note periods). Each feature is standardised with the mean and std
    of ``reference_size`` seeded real melodies (so features weigh alike in FAD and cosines are centred).
    Differentiable; no trained weights."""

    name = "toy/music_encoder"
    differentiable = True
    segments = 8

    def __init__(self, reference_size: int = 128, seed: int = 12345):
        super().__init__()
        mean, std = _reference_statistics(reference_size, seed)
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def embed_audio(self, wave: torch.Tensor) -> torch.Tensor:
        """Standardised features ``[B, 26]`` of waveforms ``[B, C, L]``."""
        return (self.features(wave) - self.mean.to(wave)) / self.std.to(wave)

    @classmethod
    def features(cls, wave: torch.Tensor) -> torch.Tensor:
        """The raw features ``[B, 26]`` (see the class docstring)."""
        energy = pitch_energy(wave)  # [B, P, T]
        total = energy.sum(1)  # [B, T]
        log_total = torch.log1p(ONSET_COMPRESSION * total)
        loudness = torch.stack([log_total.mean(-1), log_total.std(-1)], -1)
        per_pitch = pitch_energy(wave, LONG).sum(-1)
        chroma = torch.zeros(wave.shape[0], 12, device=wave.device, dtype=per_pitch.dtype)
        chroma = chroma.index_add(1, torch.arange(LOW, HIGH + 1, device=wave.device) % 12, per_pitch)
        chroma = chroma / (chroma.sum(-1, keepdim=True) + SILENCE)
        octaves = (torch.arange(LOW, HIGH + 1, device=wave.device, dtype=energy.dtype) - LOWEST) / 12
        t = energy.shape[-1] - energy.shape[-1] % cls.segments
        seg_energy = energy[..., :t].reshape(*energy.shape[:2], cls.segments, -1).sum(-1)  # [B, P, S]
        contour = (seg_energy * octaves[:, None]).sum(1) / (seg_energy.sum(1) + SILENCE)
        flux = onset_envelope(energy)
        rhythm = [flux.mean(-1), flux.std(-1)] + [cls._autocorrelation(flux, lag) for lag in cls._periods()]
        return torch.cat([loudness, chroma, contour, torch.stack(rhythm, -1)], -1)

    @staticmethod
    def _periods() -> list[int]:
        """Note periods in analysis frames, fast then slow (4 and 8 at 16 grid frames per second)."""
        return [2 * FRAMES // (2 * TEMPOS[t]) for t in ("fast", "slow")]

    @staticmethod
    def _autocorrelation(flux: torch.Tensor, lag: int) -> torch.Tensor:
        centred = flux - flux.mean(-1, keepdim=True)
        return (centred[:, lag:] * centred[:, :-lag]).sum(-1) / (centred.pow(2).sum(-1) + 1e-6)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.embed_audio(wave)


@functools.lru_cache(maxsize=4)
def _reference_statistics(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the raw encoder features over ``n`` seeded real melodies (cached: every encoder
    built with the same arguments standardises alike)."""
    from .melody import random_melodies, render

    with torch.no_grad():
        features = ToyMusicEncoder.features(render(random_melodies(n, seed)[1]))
    return features.mean(0), features.std(0).clamp_min(1e-3)
