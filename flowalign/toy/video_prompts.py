"""Moving-digit prompts ("a seven moving to the right", "the digit 3 sliding up") and a seeded prompt generator."""
from __future__ import annotations

import random

from ..rewards.toy.digits import DIGIT_WORDS
from ..rewards.toy.motion import DIRECTIONS, parse_direction

__all__ = ["DIRECTIONS", "parse_direction", "caption", "random_caption", "sample_prompts", "all_captions"]

#: How a direction is said; {m} in a template.
MOTION_PHRASES: dict[str, list[str]] = {
    "right": ["to the right", "right", "rightwards"], "left": ["to the left", "left", "leftwards"],
    "up": ["up", "upwards"], "down": ["down", "downwards"],
}
#: Training-caption templates; {w} is the word, {d} the numeral, {m} the motion.
TEMPLATES = [
    "a {w} moving {m}", "the digit {d} sliding {m}", "a handwritten {w} moving {m}", "digit {d} moving {m}",
    "a {w} sliding {m}", "the number {w} moving {m}", "{w} moving {m}", "the digit {w} sliding {m}",
]
#: Held out of training, to check that conditioning generalises across phrasing.
HELD_OUT_TEMPLATES = ["a video of the digit {w} moving {m}", "number {d} going {m}"]


def caption(digit: int, direction: str, template: str = "a {w} moving {m}", phrase: int = 0) -> str:
    """The caption of ``digit`` moving ``direction`` in ``template`` (``phrase``: which wording of the motion)."""
    return template.format(w=DIGIT_WORDS[digit], d=digit, m=MOTION_PHRASES[direction][phrase])


def random_caption(digit: int, direction: str, rng: random.Random, templates: list[str] = TEMPLATES) -> str:
    phrases = MOTION_PHRASES[direction]
    return caption(digit, direction, rng.choice(templates), rng.randrange(len(phrases)))


def all_captions() -> list[str]:
    """Every caption, training and held-out (the text encoder's vocabulary comes from these)."""
    return [caption(d, m, t, k) for d in range(len(DIGIT_WORDS)) for m in DIRECTIONS
            for t in TEMPLATES + HELD_OUT_TEMPLATES for k in range(len(MOTION_PHRASES[m]))]


def sample_prompts(n: int, seed: int = 0, templates: list[str] = TEMPLATES) -> tuple[list[str], list[dict]]:
    """``n`` prompts with balanced digits and directions (shuffled), templates drawn, all seeded; metadata
    ``{"digit", "direction"}`` per prompt."""
    rng = random.Random(seed)
    digits = [i % 10 for i in range(n)]
    directions = [list(DIRECTIONS)[i % len(DIRECTIONS)] for i in range(n)]
    rng.shuffle(digits)
    rng.shuffle(directions)
    prompts = [random_caption(d, m, rng, templates) for d, m in zip(digits, directions)]
    return prompts, [{"digit": d, "direction": m} for d, m in zip(digits, directions)]
