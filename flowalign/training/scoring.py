"""Scoring while sampling goes on (``reward.overlap_prompts``): each finished part of an iteration's samples is
decoded on the calling thread and scored on a worker thread, at most ``reward.concurrency`` parts at once, so a
slow or remote reward costs about max(sampling, scoring) instead of their sum.

Parts hold whole prompts, so a pairwise judge still sees a whole group. The weighted (and normalised) reward is
formed once every part is back, over the whole batch, as scoring it in one call would; a part whose reward fails
follows ``reward.on_error`` (``skip``: that part's samples are NaN).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .. import rewards as reward_lib
from ..errors import FlowalignError
from .batch import IterationBatch

#: what a failing reward may raise (anything else is a bug and propagates)
REWARD_FAILURES = (reward_lib.RewardError, TimeoutError, OSError)


class OverlappedScoring:
    """Submit parts as they finish; ``finish`` waits for them and fills the batch's media and rewards."""

    def __init__(self, trainer, prompts: list[str], metadata: list[dict]):
        self.trainer, self.prompts, self.metadata = trainer, prompts, metadata
        self.pool = ThreadPoolExecutor(max_workers=trainer.cfg.reward.concurrency, thread_name_prefix="reward")
        self.media: list[torch.Tensor] = []
        self.futures: list[Future] = []

    def submit(self, leaves: torch.Tensor, leaf_row: torch.Tensor, leaf_groups: torch.Tensor) -> None:
        """Decode a finished part here (the model's device) and hand it to a worker thread to score."""
        media = self.trainer.decode_leaves(leaves)
        rows, groups = leaf_row.tolist(), leaf_groups.tolist()
        prompts = [self.prompts[r] for r in rows]
        metadata = [{**self.metadata[r], "group": g} for r, g in zip(rows, groups)]
        self.media.append(media)
        self.futures.append(self.pool.submit(self.trainer.reward.score_all, media, prompts, metadata))

    def finish(self, batch: IterationBatch) -> None:
        """Every part's raw scores, in order; then the weighted reward over the whole batch."""
        try:
            parts = [self._result(future, len(media), batch.iteration, media.device)
                     for future, media in zip(self.futures, self.media)]
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        batch.media = torch.cat(self.media)
        names = list(self.trainer.reward.parts)
        raw = {name: torch.cat([p[name] for p in parts]) for name in names}
        batch.rewards = self.trainer.reward.combine(raw)
        batch.reward_parts = raw if all(torch.isfinite(v).all() for v in raw.values()) else {}

    def _result(self, future: Future, n: int, iteration: int, device) -> dict[str, torch.Tensor]:
        try:
            return {k: v.detach() for k, v in future.result().items()}
        except REWARD_FAILURES as err:
            if self.trainer.cfg.reward.on_error == "stop":
                raise FlowalignError(f"reward failed at iteration {iteration} ({err}); stopping (set "
                                     "reward.on_error=skip to skip such samples)") from None
            print(f"flowalign: warning: reward failed at iteration {iteration} ({err}); skipping {n} samples")
            return {name: torch.full((n,), float("nan"), device=device) for name in self.trainer.reward.parts}
