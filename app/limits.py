"""The app's caps on what one request may ask for, and the checks that turn a bad input into one sentence.

Every check raises ``FlowalignError`` with a line that names the input and the limit (``limits.KEY`` in
the app config), so the page shows it as it is.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import bounded
from ..errors import FlowalignError


@dataclass
class Limits:
    """Caps per request; the sliders in the page stop at them too."""

    max_prompt_chars: int = bounded(300, min=1, doc="characters per prompt")
    max_prompts: int = bounded(4, min=1, doc="prompts per Compare request")
    max_samples: int = bounded(4, min=1, doc="seeds per prompt in Compare")
    max_batch: int = bounded(16, min=1, doc="samples per model in one request (prompts x seeds)")
    max_checkpoints: int = bounded(3, min=0, doc="aligned checkpoints compared at once")
    max_steps: int = bounded(50, min=1, doc="sampling / ODE steps")
    max_iterations: int = bounded(50, min=1, doc="ReNO / CARINOX iterations, best-of-N candidates")
    max_carinox_seeds: int = bounded(3, min=1, doc="CARINOX k")
    max_guidance: float = bounded(20.0, min=0.0)
    max_lora_scale: float = bounded(2.0, min=0.0)
    max_lr: float = bounded(50.0, min=0.0)
    max_rewards: int = bounded(6, min=1, doc="rewards scored or optimised at once")


def check_int(name: str, value, low: int, high: int, key: str) -> int:
    """``value`` as an int in [low, high], or one sentence naming the input and the app limit."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FlowalignError(f"{name}: expected a whole number, got {value!r}") from None
    if number != int(number):
        raise FlowalignError(f"{name}: expected a whole number, got {value!r}")
    number = int(number)
    if number < low:
        raise FlowalignError(f"{name}: {number} is below {low}")
    if number > high:
        raise FlowalignError(f"{name}: {number} is above this app's limit of {high} ({key})")
    return number


def check_float(name: str, value, low: float, high: float, key: str) -> float:
    """``value`` as a float in [low, high], or one sentence naming the input and the app limit."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FlowalignError(f"{name}: expected a number, got {value!r}") from None
    if number != number or not low <= number <= high:
        raise FlowalignError(f"{name}: {number:g} is outside [{low:g}, {high:g}] (this app's limit: {key})")
    return number


def check_prompts(text: str | list[str], limits: Limits, max_prompts: int | None = None) -> list[str]:
    """Non-empty prompts (one per line), each within ``max_prompt_chars``, at most ``max_prompts``."""
    lines = text.splitlines() if isinstance(text, str) else list(text or [])
    prompts = [p.strip() for p in lines if p and p.strip()]
    if not prompts:
        raise FlowalignError("prompt: enter a prompt")
    cap = limits.max_prompts if max_prompts is None else max_prompts
    if len(prompts) > cap:
        raise FlowalignError(f"prompt: {len(prompts)} prompts given, this app takes at most {cap} "
                             "(limits.max_prompts)")
    for p in prompts:
        if len(p) > limits.max_prompt_chars:
            raise FlowalignError(f"prompt: {len(p)} characters, this app takes at most {limits.max_prompt_chars} "
                                 "(limits.max_prompt_chars)")
    return prompts
