"""Inference-time alignment: optimise or select the initial noise of a frozen generator against rewards.

    result = flowalign.optimize(gen, "a handwritten seven", {"toy/bold_digit": 1.0}, method="reno")
    result.image, result.reward, result.trajectory, result.nfe

    for progress in flowalign.optimize_iter(gen, prompt, "toy/classifier", method="carinox", k=2):
        ...  # progress.iteration / progress.total, progress.best, progress.images; the last has .result

Methods: ``reno`` (``flowalign.algorithms.reno``), ``carinox`` (``...carinox``), ``best-of-n``
(``...best_of_n``). Compute is counted in model evaluations (``result.nfe``): forward passes of the
velocity model plus backward passes through it, one NFE each.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

from .algorithms.carinox import CARINOX_SEEDS
from .algorithms.noise import OptimizeResult, Progress
from .algorithms.reno import ReNOConfig
from .errors import FlowalignError
from .generators.base import Generator

__all__ = ["CARINOX_SEEDS", "METHODS", "OptimizeResult", "Progress", "ReNOConfig", "optimize", "optimize_iter",
           "resolve_reward", "save_outputs"]

METHODS = ("reno", "carinox", "best-of-n")
_CARINOX_KEYS = {"k", "seeds", "top", "categorize", "category_weights", "matched_iterations"}
_BON_KEYS = {"n", "nfe_budget", "batch_size", "steps", "guidance", "negative_prompt", "keep_images"}


def resolve_reward(reward_or_weights):
    """A Reward as is; a name (``"toy/ink"``, ``"toy/ink:0.5"``); a list of such names; or ``{name: weight}``."""
    from . import rewards
    if isinstance(reward_or_weights, rewards.Reward):
        return reward_or_weights
    if isinstance(reward_or_weights, str):
        reward_or_weights = [reward_or_weights]
    if isinstance(reward_or_weights, (list, tuple)):
        weights = {}
        for spec in reward_or_weights:
            name, weight = spec.rsplit(":", 1) if ":" in spec else (spec, "1")
            try:
                weights[name] = float(weight)
            except ValueError:
                raise FlowalignError(f"reward '{spec}': expected NAME or NAME:WEIGHT with a number") from None
        reward_or_weights = weights
    if isinstance(reward_or_weights, dict):
        if not reward_or_weights:
            raise FlowalignError("optimize: give at least one reward")
        return rewards.load_weighted({k: float(v) for k, v in reward_or_weights.items()})
    raise FlowalignError(f"optimize: expected a Reward, a reward name or {{name: weight}}, "
                         f"got {type(reward_or_weights).__name__}")


def optimize_iter(gen: Generator, prompt: str | list[str], reward_or_weights, method: str = "reno",
                  seed: int = 0, metadata: list[dict] | None = None, **options) -> Iterator[Progress]:
    """Yield a ``Progress`` per iteration; the last one has ``.result`` (an ``OptimizeResult``).

    Options: ReNO's (``iterations`` 50, ``lr`` 5, ``optimizer`` sgd|adam, ``momentum`` 0.9, ``grad_clip``
    0.1, ``reg_weight`` 0.01, ``steps``, ``render_steps``, ``guidance``, ``checkpointing``, ``truncate``,
    ``keep_images``); CARINOX adds ``k`` 3, ``seeds``, ``top``, ``categorize``, ``category_weights``,
    ``matched_iterations`` 30; best-of-N takes ``n`` 50 or ``nfe_budget``, ``steps``, ``guidance``."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise FlowalignError("optimize: give at least one prompt")
    if method not in METHODS:
        raise FlowalignError(f"method: expected one of {', '.join(METHODS)}, got '{method}'")
    reward = resolve_reward(reward_or_weights)
    if method == "best-of-n":
        from .algorithms.best_of_n import run_best_of_n

        unknown = set(options) - _BON_KEYS
        if unknown:
            raise FlowalignError(f"best-of-n: unknown option(s) {', '.join(sorted(unknown))} "
                                 f"(known: {', '.join(sorted(_BON_KEYS))})")
        yield from run_best_of_n(gen, prompts, reward, seed=seed, metadata=metadata, **options)
        return
    fields = {f.name for f in dataclasses.fields(ReNOConfig)}
    extra = _CARINOX_KEYS if method == "carinox" else set()
    unknown = set(options) - fields - extra
    if unknown:
        raise FlowalignError(f"{method}: unknown option(s) {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(sorted(fields | extra))})")
    config = ReNOConfig(**{k: v for k, v in options.items() if k in fields})
    if method == "reno":
        from .algorithms.reno import run_reno

        yield from run_reno(gen, prompts, reward, config, seed=seed, metadata=metadata)
    else:
        from .algorithms.carinox import run_carinox

        yield from run_carinox(gen, prompts, reward, config, seed=seed, metadata=metadata,
                               **{k: v for k, v in options.items() if k in extra})


def optimize(gen: Generator, prompt: str | list[str], reward_or_weights, method: str = "reno", seed: int = 0,
             metadata: list[dict] | None = None, **options) -> OptimizeResult:
    """Run ``optimize_iter`` to the end and return its ``OptimizeResult`` (the best image per prompt)."""
    last = None
    for last in optimize_iter(gen, prompt, reward_or_weights, method, seed, metadata, **options):
        pass
    return last.result


def save_outputs(result: OptimizeResult, out) -> dict[str, object]:
    """Write ``best.png`` (the best image per prompt), ``iterations/NNN.png`` (every iterate),
    ``rewards.csv`` (iteration, prompt, seed, reward, ||ε||, each part) and ``rewards.png`` (the trajectory)."""
    import csv
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .inference import save_grid

    out = Path(out)
    (out / "iterations").mkdir(parents=True, exist_ok=True)
    save_grid(result.images, out / "best.png", nrow=min(len(result.prompts), 10))
    rows = len(result.row_prompt)
    for i, images in enumerate(result.iteration_images):
        save_grid(images, out / "iterations" / f"{i:03d}.png", nrow=min(rows, 10))
    with open(out / "rewards.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["iteration", "prompt", "seed", "reward", "noise_norm"])
        for it in range(result.trajectory.shape[0]):
            for r in range(result.trajectory.shape[1]):
                seed = result.row_seed[r] + (it if result.method == "best-of-n" else 0)
                norm = "" if result.noise_norms is None else f"{float(result.noise_norms[it, r]):.6g}"
                writer.writerow([it, result.prompts[result.row_prompt[r]], seed,
                                 f"{float(result.trajectory[it, r]):.6g}", norm])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in range(result.trajectory.shape[1]):
        label = f"{result.prompts[result.row_prompt[r]]} (seed {result.row_seed[r]})"
        ax.plot(result.trajectory[:, r].numpy(), label=label[:40], lw=1)
    ax.set_xlabel("candidate" if result.method == "best-of-n" else "iteration")
    ax.set_ylabel("reward")
    ax.set_title(f"{result.method}: reward trajectory (best {float(result.rewards.mean()):.4g}, NFE {result.nfe})")
    if result.trajectory.shape[1] <= 8:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "rewards.png", dpi=100)
    plt.close(fig)
    return {"best": out / "best.png", "csv": out / "rewards.csv", "plot": out / "rewards.png"}
