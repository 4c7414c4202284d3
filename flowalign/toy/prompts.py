"""Toy digit prompts: caption templates and a seeded prompt generator."""
from __future__ import annotations

import random

from ..rewards.toy.digits import DIGIT_WORDS, parse_digit

__all__ = ["DIGIT_WORDS", "parse_digit", "caption", "random_caption", "sample_prompts"]

#: Training-caption templates; {w} is the word, {d} the numeral.
TEMPLATES = [
    "a handwritten {w}", "the digit {d}", "a {w}", "the number {w}", "digit {d}",
    "a handwritten digit {d}", "{w}", "an image of a {w}", "a drawing of the number {d}",
]
#: Held out of training, used to check that conditioning generalises across phrasing.
HELD_OUT_TEMPLATES = ["a picture of the digit {w}", "number {d}"]


def caption(digit: int, template: str = "a handwritten {w}") -> str:
    """The caption of ``digit`` in ``template``."""
    return template.format(w=DIGIT_WORDS[digit], d=digit)


def random_caption(digit: int, rng: random.Random, templates: list[str] = TEMPLATES) -> str:
    return caption(digit, rng.choice(templates))


def sample_prompts(n: int, seed: int = 0, templates: list[str] = TEMPLATES) -> tuple[list[str], list[int]]:
    """``n`` prompts whose digits are balanced (0-9 in turn, shuffled) and templates drawn, both seeded."""
    rng = random.Random(seed)
    digits = [i % 10 for i in range(n)]
    rng.shuffle(digits)
    return [random_caption(d, rng, templates) for d in digits], digits
