"""CARINOX (Kasaei et al., arXiv 2509.17458): exploration over seeds + ReNO with per-reward clipping.

    for each of k seeds (default [0, 94, 58, 45, 15][:k], offset by ``seed``):
        ReNO from that seed's noise, 50 iterations, SGD-Nesterov lr 5, where every reward's gradient
        ∇(w_i·L_i + reg) is clipped to 0.1 on its own ("Multi-Clip"; the regulariser sits inside every
        term, as in the reference code), the clipped gradients summed and the sum clipped to 0.1 again;
        the selection total is Σ_i m_i·s_i (the category multipliers, not the loss weights w_i)
    return, per prompt, the best image over all seeds and iterations

Exploration: with ``top < k`` the k initial noises are scored first (k samples) and only the ``top``
best are optimised (best-of-k ∘ ReNO); the default ``top = k`` optimises every seed, as the reference.
Category-aware weights: ``categorize(prompt) -> category`` picks a row of ``category_weights``
(multipliers per reward, 1 for a reward the row omits), which scale both w_i·L_i and the selection total.
Compute-matched selection: the result's ``matched`` holds the best within the first
``matched_iterations`` (30) iterations of every seed, the reference's "i30" figure.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..errors import FlowalignError
from ..generators.base import Generator
from .noise import NoiseRun, OptimizeResult, Progress, finish_render, render, reward_parts, score_selection, tile
from .reno import ReNOConfig, run_noise_optimization

CARINOX_SEEDS = [0, 94, 58, 45, 15]
#: CARINOX's reward weights w_i (final code), in this toolkit's names (VQAScore and DA-score are plug-ins).
CARINOX_WEIGHTS = {"hpsv2.1": 5.0, "imagereward": 5.0, "vqascore": 1.0, "da-score": 5.0}
#: Per-category multipliers of the reference's category-aware weighting (its older commit ccbdcf4,
#: ``weights.json``): all ten categories, in this toolkit's reward names.
CATEGORY_WEIGHTS = {
    "color": {"hpsv2.1": 0.40, "imagereward": 1.06, "da-score": 1.41, "vqascore": 1.14},
    "shape": {"hpsv2.1": 0.95, "imagereward": 1.12, "da-score": 1.00, "vqascore": 0.92},
    "texture": {"hpsv2.1": 0.90, "imagereward": 1.10, "da-score": 1.07, "vqascore": 0.93},
    "2d_spatial": {"hpsv2.1": 1.06, "imagereward": 1.02, "da-score": 0.82, "vqascore": 1.10},
    "non_spatial": {"hpsv2.1": 1.01, "imagereward": 0.96, "da-score": 0.85, "vqascore": 1.17},
    "complex": {"hpsv2.1": 0.67, "imagereward": 1.05, "da-score": 1.21, "vqascore": 1.06},
    "3d_spatial": {"hpsv2.1": 0.96, "imagereward": 0.92, "da-score": 0.68, "vqascore": 1.43},
    "numeracy": {"hpsv2.1": 1.02, "imagereward": 1.05, "da-score": 1.00, "vqascore": 0.93},
    "overall": {"hpsv2.1": 0.59, "imagereward": 0.94, "da-score": 1.12, "vqascore": 1.34},
    "none": {"hpsv2.1": 1.0, "imagereward": 1.0, "da-score": 1.0, "vqascore": 1.0},
}


def default_categorize(prompt: str) -> str | None:
    """No category (multipliers 1) unless a hook is given: CARINOX's categories came from an LLM."""
    return None


def category_multipliers(prompts: list[str], names: list[str], table: dict[str, dict[str, float]] | None,
                         categorize: Callable[[str], str | list | None] | None) -> torch.Tensor:
    """[B, R] multipliers: the table row (``CATEGORY_WEIGHTS`` unless another is given) of each prompt's category,
    1 where none applies. A hook may also return ``[[category, probability], ...]`` (the reference's
    ``category_guess.json`` form): the rows are then mixed by those probabilities."""
    table, categorize = CATEGORY_WEIGHTS if table is None else table, categorize or default_categorize
    rows = []
    for p in prompts:
        guess = categorize(p)
        mix = [] if guess is None else [(guess, 1.0)] if isinstance(guess, str) else [(c, float(w)) for c, w in guess]
        unknown = [c for c, _ in mix if c not in table]
        if unknown:
            raise FlowalignError(f"carinox: prompt {p!r} has category '{unknown[0]}', which the weights table "
                                 f"lacks (known: {', '.join(table) or 'none'})")
        total = sum(w for _, w in mix) or 1.0
        rows.append([sum(w * float(table[c].get(n, 1.0)) for c, w in mix) / total if mix else 1.0 for n in names])
    return torch.tensor(rows, dtype=torch.float32)


def run_carinox(gen: Generator, prompts: list[str], reward, config: ReNOConfig, seed: int = 0, k: int = 3,
                seeds: list[int] | None = None, top: int | None = None, categorize=None,
                category_weights: dict | None = None, matched_iterations: int = 30,
                metadata: list[dict] | None = None) -> Iterator[Progress]:
    config.multiclip = True
    if seeds is None:
        if k < 1:
            raise FlowalignError(f"k: expected an integer >= 1, got {k}")
        seeds = [seed + s for s in (CARINOX_SEEDS + [1000 + j for j in range(max(0, k - 5))])[:k]]
    seeds = list(seeds)
    top = len(seeds) if top is None else top
    if not 1 <= top <= len(seeds):
        raise FlowalignError(f"top: expected an integer in 1..{len(seeds)}, got {top}")
    b = len(prompts)
    parts, base = reward_parts(reward)
    names = list(parts)
    mult = category_multipliers(prompts, names, category_weights, categorize)      # [B, R]
    w = torch.tensor([base[n] for n in names], dtype=torch.float32) * mult         # loss weights
    steps = config.steps or gen.default_steps
    guidance = gen.default_guidance if config.guidance is None else config.guidance
    cond = gen.encode(prompts, config.negative_prompt if guidance != 1.0 else None)
    noises = torch.stack([gen.initial_noise(b, torch.Generator().manual_seed(s)) for s in seeds])  # [k,B,...]
    explore_nfe = 0
    chosen = [list(range(len(seeds))) for _ in range(b)]
    if top < len(seeds):  # exploration: best-of-k initial noises by the selection reward
        imgs = render(gen, noises.flatten(0, 1), tile(cond, len(seeds)), steps, guidance)
        explore_nfe = steps * b * len(seeds)
        sel, _ = score_selection(reward, imgs, prompts * len(seeds),
                                 None if metadata is None else metadata * len(seeds), mult.repeat(len(seeds), 1))
        order = sel.view(len(seeds), b).argsort(dim=0, descending=True)
        chosen = [order[:top, i].tolist() for i in range(b)]
        yield Progress("carinox", "explore", 1, 1, sel, sel.view(len(seeds), b).max(0).values, imgs.cpu(),
                       explore_nfe)
    row_prompt = [i for c in range(top) for i in range(b)]
    row_seed_idx = [chosen[i][c] for c in range(top) for i in range(b)]
    noise = torch.stack([noises[s, i] for s, i in zip(row_seed_idx, row_prompt)])
    rows_cond = tile(cond, top)
    rows_meta = None if metadata is None else [metadata[i] for i in row_prompt]
    run = None
    for item in run_noise_optimization(gen, rows_cond, noise, reward, config, weights=w[row_prompt],
                                       selection_weights=mult[row_prompt], metadata=rows_meta,
                                       matched_iterations=matched_iterations, method="carinox"):
        if isinstance(item, NoiseRun):
            run = item
            break
        best = item.best_rewards.view(top, b).max(0).values
        yield Progress("carinox", "optimize", item.iteration + 1, item.total, item.rewards, best, item.images,
                       explore_nfe + item.nfe)
    per = run.best_rewards.view(top, b)
    pick = per.argmax(0)                                   # the best seed per prompt
    rows = torch.tensor([int(pick[i]) * b + i for i in range(b)])
    result = OptimizeResult(
        "carinox", list(prompts), run.best_images[rows], run.best_rewards[rows],
        {n: v[rows] for n, v in run.best_parts.items()}, run.best_noise.cpu()[rows], run.best_iteration[rows],
        [seeds[row_seed_idx[int(r)]] for r in rows], torch.stack(run.rewards), torch.stack(run.noise_norms),
        run.images, row_prompt, [seeds[s] for s in row_seed_idx], run.nfe_forward + explore_nfe,
        run.nfe_backward, run.nfe_recompute, stopped=run.stopped)
    m = run.matched
    mrows = m["rewards"].view(top, b).argmax(0)
    mr = torch.tensor([int(mrows[i]) * b + i for i in range(b)])
    result.matched = {"iterations": m["iterations"], "rewards": m["rewards"][mr], "images": m["images"][mr],
                      "nfe": explore_nfe + top * b * (steps * m["iterations"]
                                                      + (steps if config.truncate is None
                                                         else min(steps, config.truncate))
                                                      * len(names) * max(0, m["iterations"] - 1))}
    finish_render(gen, result, reward, config, cond, metadata, mult)
    yield Progress("carinox", "done", len(run.rewards), config.iterations, run.rewards[-1], result.rewards, None,
                   result.nfe, result)
