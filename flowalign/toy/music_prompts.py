"""Toy music prompts: caption templates per melody pattern and a seeded, balanced prompt generator."""
from __future__ import annotations

import itertools
import random
import re

from ..rewards.toy.melody import KEYS, PATTERNS, TEMPOS, Melody, parse_melody

__all__ = ["KEYS", "PATTERNS", "TEMPOS", "Melody", "parse_melody", "caption", "random_caption", "sample_prompts",
           "all_captions", "TEMPLATES", "HELD_OUT_TEMPLATES"]

#: Training templates per pattern; {k} is the key ("G major"), {t} the tempo word and a space, or nothing.
TEMPLATES = {
    "ascending scale": ["a {t}ascending {k} scale", "a {t}{k} scale going up", "{t}ascending scale in {k}",
                        "a {t}rising {k} scale"],
    "descending scale": ["a {t}descending {k} scale", "a {t}{k} scale going down", "{t}descending scale in {k}",
                         "a {t}falling {k} scale"],
    "arpeggio": ["a {t}arpeggio in {k}", "a {t}{k} arpeggio", "{t}arpeggio in {k}", "a {t}broken chord in {k}"],
    "repeated notes": ["{t}repeated notes in {k}", "a {t}repeated note in {k}", "{t}repeated {k} notes",
                       "the {t}tonic of {k} repeated"],
}
#: Held out of training (word order and "played"), to check that conditioning generalises across phrasing.
HELD_OUT_TEMPLATES = {
    "ascending scale": ["{k} scale ascending{p}"],
    "descending scale": ["{k} scale descending{p}"],
    "arpeggio": ["{k} arpeggio{p}"],
    "repeated notes": ["{k} notes repeated{p}"],
}


def caption(melody: Melody, template: str | None = None) -> str:
    """The caption of ``melody`` in ``template`` (default: the pattern's first); a None tempo is left unsaid."""
    template = template or TEMPLATES[melody.pattern][0]
    text = template.format(k=melody.key, t=f"{melody.tempo} " if melody.tempo else "",
                           p=f", played {melody.tempo}" if melody.tempo else "")
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def random_caption(melody: Melody, rng: random.Random, templates: dict[str, list[str]] = TEMPLATES,
                   say_tempo: float = 0.75) -> str:
    """A caption in a random template; the tempo is said with probability ``say_tempo``."""
    if rng.random() >= say_tempo:
        melody = Melody(melody.key, melody.pattern, None)
    return caption(melody, rng.choice(templates[melody.pattern]))


def sample_prompts(n: int, seed: int = 0,
                   templates: dict[str, list[str]] = TEMPLATES) -> tuple[list[str], list[Melody]]:
    """``n`` prompts cycling through every key x pattern x tempo (shuffled), templates drawn; all seeded.
    Every prompt says its tempo, so all the music rewards apply."""
    rng = random.Random(seed)
    combos = [Melody(k, p, t) for k, p, t in itertools.product(KEYS, PATTERNS, TEMPOS)]
    rng.shuffle(combos)
    melodies = [combos[i % len(combos)] for i in range(n)]
    rng.shuffle(melodies)
    return [random_caption(m, rng, templates, say_tempo=1.0) for m in melodies], melodies


def all_captions() -> list[str]:
    """Every caption the templates (training and held out) can make: the text encoder's vocabulary."""
    out = []
    for key, pattern, tempo in itertools.product(KEYS, PATTERNS, [*TEMPOS, None]):
        for template in TEMPLATES[pattern] + HELD_OUT_TEMPLATES[pattern]:
            out.append(caption(Melody(key, pattern, tempo), template))
    return out
