"""Scoring in training: guarded against failing rewards, and optionally while sampling goes on.

``guarded_scores``: any exception from a reward, a wrong number of scores, a non-finite score or a call longer
than ``reward.timeout_s`` follows ``reward.on_error``: ``stop`` (one line), or ``skip``, where the samples are
scored again one at a time and only those that still fail are NaN (a pairwise or groupwise judge compares whole
groups, so its whole call is).

``OverlappedScoring`` (``reward.overlap_prompts``): each finished part of an iteration's samples is decoded on the
calling thread and scored on a worker thread, at most ``reward.concurrency`` parts at once, so a slow or remote
reward costs about max(sampling, scoring) instead of their sum. Parts hold whole prompts. The weighted (and
normalised) reward is formed once every part is back, over the whole batch, as scoring it in one call would.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .. import rewards as reward_lib
from ..errors import FlowalignError
from ..rewards.media import cat_media
from .batch import IterationBatch


def call_with_timeout(fn, timeout: float, *args):
    """``fn(*args)`` on a daemon thread, waiting at most ``timeout`` seconds (0: no limit). A call that does not
    return is left behind (a daemon thread does not hold up the process's exit)."""
    if not timeout:
        return fn(*args)
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as err:  # handed to the caller's thread
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True, name="reward-call")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no answer within reward.timeout_s={timeout:g}")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _where(iteration: int | str) -> str:
    return f"iteration {iteration}" if isinstance(iteration, int) else iteration


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if isinstance(err, reward_lib.RewardError) else f"{type(err).__name__}: {text}"


def guarded_scores(trainer, media: torch.Tensor, prompts: list[str], metadata: list[dict],
                   iteration: int | str) -> dict[str, torch.Tensor]:
    """Every reward part's raw scores for ``media``, with ``reward.on_error`` applied to any failure."""
    reward, options = trainer.reward, trainer.cfg.reward
    try:
        return call_with_timeout(reward.score_all, options.timeout_s, media, prompts, metadata)
    except Exception as err:  # a plug-in may raise anything
        if options.on_error == "stop":
            raise FlowalignError(f"reward failed at {_where(iteration)} ({_one_line(err)}); stopping (set "
                                 "reward.on_error=skip to skip such samples)") from None
        failure = err
    nan = lambda n: {name: torch.full((n,), float("nan"), device=media.device) for name in reward.parts}  # noqa: E731
    whole_groups = any(part.whole_groups for part in reward.parts.values())
    rows = []
    for i in range(len(media) if not whole_groups and len(media) > 1 else 0):
        try:
            rows.append(call_with_timeout(reward.score_all, options.timeout_s, media[i:i + 1], prompts[i:i + 1],
                                          metadata[i:i + 1]))
        except Exception:  # this sample is skipped
            rows.append(nan(1))
    scores = {name: torch.cat([r[name].detach() for r in rows]) for name in reward.parts} if rows else nan(len(media))
    skipped = int(torch.isnan(torch.stack(list(scores.values()))).any(dim=0).sum())
    print(f"flowalign: warning: reward failed at {_where(iteration)} ({_one_line(failure)}); skipping {skipped} "
          f"of {len(media)} samples")
    return scores


class GuardedEvaluation:
    """The report's scorer: each part's raw scores through ``guarded_scores`` (so ``reward.on_error`` holds at
    evaluation too), weighted but never normalised (the report speaks in the rewards' own units, and evaluating
    leaves the running statistics alone). A skipped sample is NaN and left out of the report's means."""

    def __init__(self, trainer, label: str):
        self.trainer, self.label = trainer, label

    def score(self, media: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        raw = guarded_scores(self.trainer, media, prompts, metadata, self.label)
        return sum(self.trainer.reward.weights[name] * s.detach() for name, s in raw.items())


class OverlappedScoring:
    """Submit parts as they finish; ``finish`` waits for them and fills the batch's media and rewards."""

    def __init__(self, trainer, prompts: list[str], metadata: list[dict], iteration: int):
        self.trainer, self.prompts, self.metadata, self.iteration = trainer, prompts, metadata, iteration
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
        self.futures.append(self.pool.submit(guarded_scores, self.trainer, media, prompts, metadata,
                                             self.iteration))

    def finish(self, batch: IterationBatch) -> None:
        """Every part's raw scores, in order; then the weighted reward over the whole batch."""
        try:
            parts = [future.result() for future in self.futures]
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        batch.media = cat_media(self.media)
        raw = {name: torch.cat([p[name] for p in parts]) for name in self.trainer.reward.parts}
        batch.rewards = self.trainer.reward.combine(raw, self.trainer.acc.gather)
        batch.reward_parts = raw if all(torch.isfinite(v).all() for v in raw.values()) else {}
