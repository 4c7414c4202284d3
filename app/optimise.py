"""Optimise: ReNO, CARINOX or best-of-N on one prompt, streamed step by step for the Optimise tab.

``run_optimise`` yields an ``OptimiseStep`` per iteration (the last one carries the result). It holds
the model's lock only while an iteration computes, never across a ``yield``, so a cancelled run (the
Stop button) leaves nothing locked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import FlowalignError
from ..optimize import CARINOX_SEEDS, METHODS, OptimizeResult, Progress, optimize_iter
from .limits import Limits, check_float, check_int, check_prompts
from .models import ModelCache, check_lora_folder, load_adapters, using


@dataclass
class OptimiseStep:
    """One streamed report: the newest iterate's media per row, the trajectory so far, the best so far."""

    method: str
    stage: str
    iteration: int
    total: int
    modality: str
    row_labels: list[str]
    media: torch.Tensor | None                  # [R, ...] this iterate's media (None on the final report)
    rewards: list[float]                        # [R] this iterate's reward per row
    trajectory: list[tuple[int, float, str]]    # (step, reward, series): each reward x weight, the total, the best
    best: float
    nfe: int
    result: OptimizeResult | None = None
    settings: dict = field(default_factory=dict)

    def status(self) -> str:
        """One line for the page: progress, best reward, compute."""
        word = "candidate" if self.method == "best-of-n" else "iteration"
        head = "done" if self.result is not None else f"{self.stage} {word} {self.iteration}/{self.total}"
        return f"{self.method}: {head} · best reward {self.best:.4f} · {self.nfe} NFE"


def parse_weights(selected: list[str], weights: dict[str, float], extra: str = "") -> dict[str, float]:
    """The chosen rewards and their weights: ticked names (weight from ``weights``, default 1) plus
    ``extra``, a comma-separated ``NAME[:WEIGHT]`` list for rewards the page does not list."""
    out = {name: float(weights.get(name, 1.0)) for name in selected or []}
    for spec in (extra or "").split(","):
        spec = spec.strip()
        if not spec:
            continue
        name, _, weight = spec.partition(":")
        try:
            out[name.strip()] = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise FlowalignError(f"reward '{spec}': expected NAME or NAME:WEIGHT with a number") from None
    bad = [n for n, w in out.items() if not math.isfinite(w)]
    if bad:
        raise FlowalignError(f"reward '{bad[0]}': the weight must be a finite number")
    return out


def method_options(method: str, iterations: int, lr: float, steps: int | None, k: int, limits: Limits) -> dict:
    """``optimize_iter`` options for ``method`` from the page's values, each within the app's limits."""
    if method not in METHODS:
        raise FlowalignError(f"method: expected one of {', '.join(METHODS)}, got '{method}'")
    iterations = check_int("iterations", iterations, 1, limits.max_iterations, "limits.max_iterations")
    steps = None if steps in (None, "") else check_int("steps", steps, 1, limits.max_steps, "limits.max_steps")
    if method == "best-of-n":
        return {"n": iterations, "steps": steps, "batch_size": 1}
    options = {"iterations": iterations, "lr": check_float("learning rate", lr, 1e-6, limits.max_lr, "limits.max_lr"),
               "steps": steps}
    if method == "carinox":
        options["k"] = check_int("CARINOX seeds (k)", k, 1, limits.max_carinox_seeds, "limits.max_carinox_seeds")
        options["matched_iterations"] = min(30, iterations)
    return options


def row_labels(method: str, seed: int, options: dict) -> list[str]:
    """One series name per optimised row."""
    if method == "best-of-n":
        return ["candidate"]
    if method == "carinox":
        return [f"seed {seed + s}" for s in CARINOX_SEEDS[:options["k"]]]
    return [f"seed {seed}"]


def run_optimise(cache: ModelCache, limits: Limits, model: str, method: str, prompt: str,
                 weights: dict[str, float], seed: int = 0, iterations: int = 15, lr: float = 5.0,
                 steps: int | None = None, k: int = 2, checkpoint: str | None = None,
                 lora_scale: float = 1.0) -> Iterator[OptimiseStep]:
    """Run ``method`` on ``prompt`` against the weighted rewards; yield an ``OptimiseStep`` per iteration."""
    prompts = check_prompts(prompt, limits, max_prompts=1)
    seed = check_int("seed", seed, 0, 2 ** 31 - 1, "seed")
    options = method_options(method, iterations, lr, steps, k, limits)
    if not weights:
        raise FlowalignError("rewards: choose at least one reward")
    if len(weights) > limits.max_rewards:
        raise FlowalignError(f"rewards: {len(weights)} chosen, this app takes at most {limits.max_rewards} "
                             "(limits.max_rewards)")
    scale = check_float("LoRA scale", lora_scale, 0.0, limits.max_lora_scale, "limits.max_lora_scale")
    loaded = cache.model(model)
    gen = loaded.generator
    reward = cache.weighted(weights, gen.device)
    adapter = None
    if checkpoint and str(checkpoint).strip():
        folder = check_lora_folder(checkpoint)
        with loaded.lock:
            adapter = load_adapters(loaded, [folder])[folder]
    labels = row_labels(method, seed, options)
    steps_done: list[tuple[int, float, str]] = []
    best, count = -math.inf, 0
    iterator = optimize_iter(gen, prompts, reward, method, seed, **options)
    settings = {"steps": options.get("steps") or gen.default_steps, **options}
    while True:
        with using(loaded, adapter, scale), torch.enable_grad():
            progress: Progress | None = next(iterator, None)
        if progress is None:
            return
        best = max(best, float(progress.best.max()))
        rewards_now = [float(r) for r in progress.rewards.flatten()]
        if progress.result is None and progress.stage != "explore":
            count += 1
            names = labels if len(rewards_now) == len(labels) else [f"row {r}" for r in range(len(rewards_now))]
            steps_done += [(count, r, f"total · {name}") for r, name in zip(rewards_now, names)]
            if len(weights) > 1 and progress.images is not None:  # what each reward adds to the leading row
                lead = max(range(len(rewards_now)), key=rewards_now.__getitem__)
                steps_done += [(count, value, name) for name, value in
                               weighted_parts(cache, weights, progress.images[lead:lead + 1], prompts[0]).items()]
            steps_done.append((count, best, "best total so far"))
        yield OptimiseStep(method, progress.stage, progress.iteration, progress.total, gen.modality, labels,
                           progress.images, rewards_now, list(steps_done), best, progress.nfe, progress.result,
                           settings)



@torch.no_grad()
def weighted_parts(cache: ModelCache, weights: dict[str, float], media: torch.Tensor, prompt: str) -> dict[str, float]:
    """``NAME × WEIGHT`` -> that reward's weighted score of one sample (the parts sum to the plotted total)."""
    return {f"{name} × {weight:g}": weight * float(cache.reward(name, media.device).score(media, [prompt])[0])
            for name, weight in weights.items()}
