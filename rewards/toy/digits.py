"""Which digit a prompt asks for: shared by the toy rewards and the toy prompt generator."""
from __future__ import annotations

import re

from ..errors import RewardError

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_WORD_TO_DIGIT = {w: i for i, w in enumerate(DIGIT_WORDS)}


def parse_digit(prompt: str) -> int | None:
    """The digit a prompt asks for ("a handwritten seven", "the digit 7"), or None if it names none."""
    for token in re.findall(r"[a-z]+|\d", prompt.lower()):
        if token.isdigit():
            return int(token)
        if token in _WORD_TO_DIGIT:
            return _WORD_TO_DIGIT[token]
    return None


def target_digits(prompts: list[str], metadata: list[dict]) -> list[int]:
    """The target of each sample: ``metadata["digit"]`` if given, else parsed from the prompt."""
    targets = []
    for prompt, meta in zip(prompts, metadata):
        digit = meta.get("digit", parse_digit(prompt))
        if digit is None:
            raise RewardError(f"toy digit reward: prompt {prompt!r} names no digit (and metadata has no 'digit')")
        targets.append(int(digit))
    return targets
