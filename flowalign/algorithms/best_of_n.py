"""Best-of-N: sample N initial noises per prompt, ODE-sample each, keep the best by reward.

The baseline ReNO and CARINOX are measured against (ReNO's ``--imageselect``). At equal compute, give it
``nfe_budget`` (e.g. a ReNO result's ``nfe``): N = budget // steps per prompt, a backward pass counted as
one model evaluation (see ``flowalign.algorithms.reno``). Candidate j of prompt i uses the noise of seed
``seed + j`` (row i), so candidate 0 is ReNO's initial noise.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..errors import FlowalignError
from ..generators.base import Generator
from .noise import OptimizeResult, Progress, render, score_selection, tile


def candidates_for_budget(nfe_budget: int, steps: int, prompts: int) -> int:
    """How many samples per prompt ``nfe_budget`` model evaluations buy at ``steps`` ODE steps."""
    return max(1, nfe_budget // (steps * prompts))


@torch.no_grad()
def run_best_of_n(gen: Generator, prompts: list[str], reward, n: int | None = None, seed: int = 0,
                  steps: int | None = None, guidance: float | None = None, negative_prompt: str = "",
                  nfe_budget: int | None = None, batch_size: int = 64, keep_images: bool = True,
                  metadata: list[dict] | None = None, **unused) -> Iterator[Progress]:
    """Yields a ``Progress`` per batch of candidates, the last one carrying the result."""
    steps = steps or gen.default_steps
    guidance = gen.default_guidance if guidance is None else guidance
    if nfe_budget is not None:
        n = candidates_for_budget(int(nfe_budget), steps, len(prompts))
    n = 50 if n is None else n
    if n < 1:
        raise FlowalignError(f"n: expected an integer >= 1, got {n}")
    b = len(prompts)
    cond = gen.encode(prompts, negative_prompt if guidance != 1.0 else None)
    per_batch = max(1, batch_size // b)
    best = torch.full((b,), -float("inf"))
    best_images, best_noise, best_idx = None, None, torch.zeros(b, dtype=torch.long)
    best_parts: dict[str, torch.Tensor] = {}
    trajectory, images_seen = [], []
    nfe = 0
    for start in range(0, n, per_batch):
        js = list(range(start, min(n, start + per_batch)))
        noise = torch.cat([gen.initial_noise(b, torch.Generator().manual_seed(seed + j)) for j in js])
        big = tile(cond, len(js))
        media = render(gen, noise, big, steps, guidance)
        nfe += steps * noise.shape[0]
        sel, parts = score_selection(reward, media, big.prompts, None if metadata is None else metadata * len(js))
        media, noise = media.cpu(), noise.cpu()
        for c, j in enumerate(js):
            rows = slice(c * b, (c + 1) * b)
            s = sel[rows]
            trajectory.append(s)
            if keep_images:
                images_seen.append(media[rows])
            better = s > best
            if best_images is None:
                best_images, best_noise = media[rows].clone(), noise[rows].clone()
            best = torch.where(better, s, best)
            best_idx[better] = j
            best_images[better] = media[rows][better]
            best_noise[better] = noise[rows][better]
            best_parts = {k: torch.where(better, v[rows], best_parts.get(k, v[rows])) for k, v in parts.items()}
        yield Progress("best-of-n", "sample", js[-1] + 1, n, sel, best.clone(),
                       media[-b:] if keep_images else None, nfe)
    result = OptimizeResult("best-of-n", list(prompts), best_images, best, best_parts, best_noise, best_idx,
                            [seed + int(j) for j in best_idx], torch.stack(trajectory), None, images_seen,
                            list(range(b)), [seed] * b, nfe, 0)
    yield Progress("best-of-n", "done", n, n, trajectory[-1], best, None, nfe, result)
