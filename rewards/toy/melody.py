"""The toy music world's symbols: keys, melody patterns, tempos, the piano-roll grid and its renderer.

Shared by the toy music rewards and by ``flowalign.toy`` (data, generator): ``rewards`` imports nothing
of ``flowalign``, so the definitions live here. A melody is an 8-note pattern of scale degrees in a key;
"slow" plays it once at 4 notes/s, "fast" twice at 8 notes/s, so every clip lasts 2 s.

The piano roll is ``[P, T]`` = 24 semitones (A3..G#5) x 32 frames of 62.5 ms, in [-1, 1]: -1 is silence,
a note is its velocity ``v`` in [0.6, 1] stored as ``2v - 1``. Each note sounds for all but the last frame
of its slot (so repeated notes have onsets). ``render`` turns rolls into waveforms with additive sines.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import RewardError

SAMPLE_RATE = 8000
FRAMES = 32
FRAME_RATE = 16  # frames per second: 32 frames = 2 s
SAMPLES_PER_FRAME = SAMPLE_RATE // FRAME_RATE
LENGTH = FRAMES * SAMPLES_PER_FRAME
LOWEST = 57  # MIDI of the grid's lowest pitch (A3); every tonic lies in 57..68
PITCHES = 24
GAIN = 0.8  # peak amplitude of one note at full velocity
RAMP_MS = 8.0  # attack/release of every note edge
VELOCITY_RANGE = (0.6, 1.0)

PITCH_NAMES = {"c": 0, "d": 2, "e": 4, "f": 5, "g": 7, "a": 9, "b": 11}
SCALES = {"major": [0, 2, 4, 5, 7, 9, 11], "minor": [0, 2, 3, 5, 7, 8, 10]}
#: The keys the toy model is trained on.
KEYS = ["C major", "G major", "D major", "F major", "A minor"]
#: Pattern name -> scale degrees (7 = the octave).
PATTERNS = {
    "ascending scale": [0, 1, 2, 3, 4, 5, 6, 7],
    "descending scale": [7, 6, 5, 4, 3, 2, 1, 0],
    "arpeggio": [0, 2, 4, 7, 0, 2, 4, 7],
    "repeated notes": [0, 0, 0, 0, 0, 0, 0, 0],
}
#: Tempo -> notes per second (the pattern is repeated to fill the 2 s clip).
TEMPOS = {"slow": 4, "fast": 8}


@dataclass(frozen=True)
class Melody:
    """What a prompt asks for; ``None`` fields are left open (any pattern / key / tempo)."""

    key: str | None = None
    pattern: str | None = None
    tempo: str | None = None


# ---- prompts -> melodies ---------------------------------------------------------------------------------

_KEY_RE = re.compile(r"\b([a-g])(#|b|\s+sharp|\s+flat)?\s+(major|minor)\b")
_PATTERN_WORDS = [("descending scale", r"descend\w*|falling|going down|downward"),
                  ("ascending scale", r"ascend\w*|rising|going up|upward"),
                  ("arpeggio", r"arpeggi\w*|broken chord"),
                  ("repeated notes", r"repeat\w*")]
_TEMPO_WORDS = [("slow", r"slow\w*"), ("fast", r"fast|quick\w*")]


def parse_melody(prompt: str) -> Melody:
    """The key, pattern and tempo a prompt names ("a slow descending G major scale"); missing ones are None."""
    text = prompt.lower()
    key = None
    if match := _KEY_RE.search(text):
        accidental = (match.group(2) or "").strip()
        accidental = {"sharp": "#", "flat": "b"}.get(accidental, accidental)
        key = f"{match.group(1).upper()}{accidental} {match.group(3)}"
    pattern = next((name for name, words in _PATTERN_WORDS if re.search(rf"\b(?:{words})\b", text)), None)
    tempo = next((name for name, words in _TEMPO_WORDS if re.search(rf"\b(?:{words})\b", text)), None)
    return Melody(key, pattern, tempo)


def target_melodies(prompts: list[str], metadata: list[dict], need: tuple[str, ...], reward: str) -> list[Melody]:
    """Each sample's melody, from ``metadata`` fields (key/pattern/tempo) over the prompt; one line if a
    field in ``need`` is missing."""
    out = []
    for prompt, meta in zip(prompts, metadata):
        parsed = parse_melody(prompt)
        melody = Melody(*(meta.get(f, getattr(parsed, f)) for f in ("key", "pattern", "tempo")))
        for field in need:
            if getattr(melody, field) is None:
                raise RewardError(f"{reward}: prompt {prompt!r} names no {field} (and metadata has no '{field}')")
        out.append(melody)
    return out


# ---- music theory ----------------------------------------------------------------------------------------

def key_tonic(key: str) -> tuple[int, str]:
    """``"G major"`` -> (MIDI of its tonic in the grid's lowest octave, 57..68; ``"major"``)."""
    match = re.fullmatch(r"([A-Ga-g])(#|b)?\s+(major|minor)", key.strip())
    if not match:
        raise RewardError(f"toy music: key {key!r} is not like 'C major' or 'F# minor'")
    pc = (PITCH_NAMES[match.group(1).lower()] + {"#": 1, "b": -1}.get(match.group(2) or "", 0)) % 12
    return LOWEST + (pc - LOWEST) % 12, match.group(3)


def key_pitch_classes(key: str) -> list[int]:
    """The seven pitch classes (0 = C) of a key's scale."""
    tonic, mode = key_tonic(key)
    return sorted((tonic + step) % 12 for step in SCALES[mode])


def note_sequence(melody: Melody) -> list[int]:
    """The MIDI pitches of a fully specified melody, one per note slot (8 slow, 16 fast)."""
    tonic, mode = key_tonic(melody.key)
    scale = SCALES[mode] + [12]
    degrees = PATTERNS[melody.pattern] * (TEMPOS[melody.tempo] // TEMPOS["slow"])
    return [tonic + scale[d] for d in degrees]


def note_spans(tempo: str) -> list[tuple[int, int]]:
    """The (first, end) frames each note sounds in; the slot's last frame is a gap."""
    slot = FRAMES // (2 * TEMPOS[tempo])
    return [(i * slot, (i + 1) * slot - 1) for i in range(FRAMES // slot)]


def piano_roll(melody: Melody, velocities: list[float] | None = None) -> torch.Tensor:
    """The ``[P, T]`` roll in [-1, 1] of a fully specified melody (all notes at full velocity by default)."""
    notes, spans = note_sequence(melody), note_spans(melody.tempo)
    velocities = velocities or [1.0] * len(notes)
    roll = torch.full((PITCHES, FRAMES), -1.0)
    for pitch, (start, end), v in zip(notes, spans, velocities):
        roll[pitch - LOWEST, start:end] = 2 * v - 1
    return roll


def random_melodies(n: int, seed: int = 0, within: Melody = Melody(),
                    keys: list[str] = KEYS) -> tuple[list[Melody], torch.Tensor]:
    """``n`` seeded melodies (open fields of ``within`` drawn at random) and their rolls ``[n, P, T]``
    with per-note velocities drawn from ``VELOCITY_RANGE``."""
    rng = random.Random(seed)
    melodies, rolls = [], []
    for _ in range(n):
        melody = Melody(within.key or rng.choice(keys), within.pattern or rng.choice(list(PATTERNS)),
                        within.tempo or rng.choice(list(TEMPOS)))
        velocities = [rng.uniform(*VELOCITY_RANGE) for _ in range(2 * TEMPOS[melody.tempo])]
        melodies.append(melody)
        rolls.append(piano_roll(melody, velocities))
    return melodies, torch.stack(rolls)


# ---- rendering -------------------------------------------------------------------------------------------

def midi_to_hz(midi: torch.Tensor | float) -> torch.Tensor:
    return 440.0 * 2 ** ((torch.as_tensor(midi, dtype=torch.float32) - 69) / 12)


_CACHE: dict[tuple[str, str, torch.dtype], torch.Tensor] = {}


def _envelope_weights(device, dtype) -> torch.Tensor:
    """``[3, S]``: at each sample of a frame, the weight of the previous, own and next frame's amplitude.

    The envelope is the per-frame amplitude smoothed by a moving average of ``RAMP_MS`` (linear attack and
    release), which within a frame mixes in only the neighbouring frames, near the edges."""
    key = ("weights", str(device), dtype)
    if key not in _CACHE:
        half = int(RAMP_MS * SAMPLE_RATE / 1000) // 2
        s = torch.arange(SAMPLES_PER_FRAME, dtype=torch.float64)
        previous = (half - s).clamp_min(0) / (2 * half + 1)
        following = (s - (SAMPLES_PER_FRAME - 1 - half)).clamp_min(0) / (2 * half + 1)
        _CACHE[key] = torch.stack([previous, 1 - previous - following, following]).to(device, dtype)
    return _CACHE[key]


def _oscillators(device, dtype) -> torch.Tensor:
    """``[3, P, T, S]``: every grid pitch's sine over every frame's samples, times the envelope weights."""
    key = ("oscillators", str(device), dtype)
    if key not in _CACHE:
        t = torch.arange(LENGTH, dtype=torch.float64) / SAMPLE_RATE
        freqs = midi_to_hz(torch.arange(LOWEST, LOWEST + PITCHES)).double()
        sines = torch.sin(2 * torch.pi * freqs[:, None] * t).view(PITCHES, FRAMES, SAMPLES_PER_FRAME)
        weights = _envelope_weights("cpu", torch.float64)
        _CACHE[key] = (weights[:, None, None, :] * sines).to(device, dtype)
    return _CACHE[key]


def render(roll: torch.Tensor) -> torch.Tensor:
    """Piano rolls ``[B, P, T]`` (or ``[B, 1, P, T]``) in [-1, 1] -> waveforms ``[B, 1, L]`` in [-1, 1].

    Additive sines: each pitch's amplitude is its roll value mapped to [0, 1], held per frame, with linear
    attack/release ramps of ``RAMP_MS``. Dividing by max(1, total amplitude) keeps chords in range and
    leaves a single note undistorted. Differentiable in the roll (zero gradient where it is clamped).
    Computed frame by frame (one batched matmul), never as a ``[B, P, L]`` envelope."""
    if roll.ndim == 4:
        roll = roll.squeeze(1)
    if roll.shape[-2:] != (PITCHES, FRAMES):
        raise RewardError(f"toy music render: expected rolls [B, {PITCHES}, {FRAMES}], got {tuple(roll.shape)}")
    amp = ((roll + 1) / 2).clamp(0, 1)
    frames = torch.stack([F.pad(amp, (1, 0))[..., :-1], amp, F.pad(amp, (0, 1))[..., 1:]], 1)  # [B, 3, P, T]
    wave = torch.einsum("bkpt,kpts->bts", frames, _oscillators(roll.device, roll.dtype))
    total = torch.einsum("bkt,ks->bts", frames.sum(2), _envelope_weights(roll.device, roll.dtype))
    return (GAIN * wave / total.clamp_min(1.0)).flatten(1).unsqueeze(1)
