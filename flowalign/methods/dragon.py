"""DRAGON (arXiv 2504.15217): distributional rewards through on-policy positive / negative sets.

Each iteration samples ``group_size`` (2) ODE samples per prompt, scores them with any reward kind, splits
them into a positive set D+ and a negative set D-, and moves the policy toward D+ and away from D- with a
preference loss on the flow-matching error relative to the frozen reference (the LoRA-off model):
``ℓ(x) = ||v_θ(x_σ) - (ε - x0)||² - ||v_ref(x_σ) - (ε - x0)||²`` (lower: the policy explains x better).

- instance rewards (aesthetics, CLAP score, per-sample FAD to exemplars): ``paired`` (best vs worst of each
  prompt's samples) or ``unpaired`` (above / below the batch median);
- set rewards (dataset FAD, Vendi): ``greedy`` swaps of each prompt's pair between the two sets while that
  raises the set reward of D+ (paper-approximate: Algorithm 1 leaves the search open);
- losses: Diffusion-DPO on pairs, ``-log σ(-β·(ℓ(x_w) - ℓ(x_l)))`` (winner and loser share σ and ε), and
  Diffusion-KTO on unpaired sets, ``1 - σ(β·(h - z_ref))`` on D+ and ``1 - σ(β·(z_ref - h))`` on D-, ``h = -ℓ``,
  ``z_ref`` the batch mean of ``h`` clamped at 0 and detached (the KL-baseline form; paper-approximate).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from .. import rewards as reward_lib
from ..seeds import derive_seed
from ..typed import bounded
from . import register_method
from .base import require
from .flow_matching import FlowMatchingMethod, FlowMatchingOptions


@dataclass
class DragonOptions(FlowMatchingOptions):
    group_size: int = bounded(2, min=2, doc="ODE samples per prompt (a pair)")
    sets: Literal["paired", "unpaired", "greedy"] = bounded(
        "paired", doc="paired: best vs worst per prompt; unpaired: above/below the median; greedy: set rewards")
    loss: Literal["dpo", "kto"] = bounded("dpo", doc="Diffusion-DPO on pairs, Diffusion-KTO on unpaired sets")
    beta: float = bounded(500.0, min=0.0, doc="the preference loss's beta")


@register_method
class Dragon(FlowMatchingMethod):
    name = "dragon"
    title = "DRAGON"
    paper = "arXiv 2504.15217"
    Options = DragonOptions
    whole_prompts = "a prompt's samples form one pair"

    @classmethod
    def check(cls, options, train, modifiers) -> None:
        super().check(options, train, modifiers)
        require(train.lora_rank > 0, "method dragon compares with the LoRA-off base: it needs train.lora_rank > 0")
        require(options.sets == "unpaired" or options.loss == "dpo",
                f"dragon.sets={options.sets} builds pairs: use dragon.loss=dpo")
        require(options.sets != "unpaired" or options.loss == "kto", "dragon.sets=unpaired has no pairs: use "
                "dragon.loss=kto")

    def setup(self, trainer) -> None:
        if self.options.sets == "greedy":
            parts = list(trainer.reward.parts.values())
            require(len(parts) == 1 and isinstance(parts[0], reward_lib.SetReward),
                    "dragon.sets=greedy needs one set reward (fd, vendi, exemplar) as the reward")

    @property
    def scores_pointwise(self) -> bool:
        return self.options.sets != "greedy"

    def update(self, trainer, batch) -> dict[str, float]:
        """Build the sets, then ``updates_per_iteration`` steps over a seeded split of the iteration's pairs (or
        samples, unpaired) that every process draws alike; each step's loss is the mean over all processes'
        members of its part, so the update does not depend on how prompts are spread."""
        o = self.options
        if o.sets == "unpaired":
            return self._unpaired_update(trainer, batch)
        if o.sets == "greedy":
            stats, winners, losers = self._greedy_sets(trainer, batch)
        else:
            stats, (winners, losers) = {}, paired_sets(batch.rewards, batch.leaf_groups)
        keys = batch.leaf_groups[winners]  # a pair is known by its prompt
        parts = torch.randperm(self.train.prompts_per_iteration, generator=self._generator(batch)).chunk(
            self.train.updates_per_iteration)
        losses = []
        for salt, part in enumerate(parts):
            mine = torch.isin(keys, part.to(keys.device))
            first = torch.zeros(1, dtype=torch.long, device=keys.device)  # a stand-in pair: sample 0 with itself
            losses.append(self._step(trainer, mine, lambda m, salt=salt, first=first: self._dpo_sum(
                trainer, batch, first if m is None else winners[m], first if m is None else losers[m], salt), stats))
        stats["pairs"] = float(trainer.acc.reduce(torch.tensor(len(winners), device=keys.device), "sum"))
        return self._summary(stats, losses)

    def _unpaired_update(self, trainer, batch) -> dict[str, float]:
        """KTO on D+ (above the median of every process's rewards) and D-, over seeded parts of all samples."""
        everyone, position = trainer.gathered(batch.rewards, batch)
        positive = unpaired_sets(everyone)[position]
        parts = torch.randperm(len(everyone), generator=self._generator(batch)).chunk(self.train.updates_per_iteration)
        stats, losses = {}, []
        samples = torch.arange(len(positive), device=positive.device)
        for salt, part in enumerate(parts):
            mine = torch.isin(batch.leaf_ids, part.to(batch.leaf_ids.device))
            losses.append(self._step(trainer, mine, lambda m, salt=salt: self._kto_sum(
                trainer, batch, samples[:1] if m is None else samples[m], positive, salt, stand_in=m is None), stats))
        stats["pairs"] = float(len(everyone))
        return self._summary(stats, losses)

    def _generator(self, batch) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.train.seed, batch.iteration, 11))

    def _step(self, trainer, mine: torch.Tensor, summed: Callable, stats: dict) -> float | None:
        """One optimizer step on this process's members ``mine`` (a mask) of a part: ``summed(mask)`` is the sum
        of their losses, scaled to the mean over every process's members (DDP averages gradients over
        processes). A process with no member of the part still joins the backward: ``summed(None)`` is a
        stand-in member's loss (adding nothing to shared statistics), weighted 0."""
        count = int(trainer.acc.reduce(mine.sum(), "sum"))
        if count == 0:
            return None
        if bool(mine.any()):
            loss = summed(mine) * trainer.acc.num_processes / count
        else:  # keeps DDP's gradient all-reduce in step with the other processes
            loss = summed(None) * 0.0
        trainer.acc.backward(loss)
        grad_norm = trainer.optimizer_step()
        if grad_norm is not None:
            stats.setdefault("_norms", []).append(float(grad_norm))
        return float(trainer.acc.reduce(loss.detach(), "mean"))

    @staticmethod
    def _summary(stats: dict, losses: list[float | None]) -> dict[str, float]:
        done = [x for x in losses if x is not None]
        norms = stats.pop("_norms", [])
        if done:
            stats["dragon_loss"] = sum(done) / len(done)
        if norms:
            stats["grad_norm"] = sum(norms) / len(norms)
        return stats

    def _greedy_sets(self, trainer, batch):
        """Set rewards: each prompt's pair swapped between D+ and D- while that raises the set reward of D+, on
        every process's samples (gathered; every process finds the same sets and keeps its own pairs)."""
        part = next(iter(trainer.reward.parts.values()))
        media, position = trainer.gathered(batch.media, batch)
        groups, _ = trainer.gathered(batch.leaf_groups, batch)
        pairs = torch.stack([torch.nonzero(groups == g).squeeze(1)[:2] for g in groups.unique()])
        set_reward = lambda idx: float(part.score_set(media[idx]))  # noqa: E731
        stats = {"reward/set_before": set_reward(pairs[:, 0])}
        winners, losers = greedy_set_swaps(set_reward, pairs)
        stats["reward/set_positive"] = set_reward(winners)
        stats["reward/mean"], stats["reward/std"] = float(part.score_set(media)), 0.0
        local = {int(p): i for i, p in enumerate(position.tolist())}
        mine = [k for k, w in enumerate(winners.tolist()) if w in local]
        to_local = lambda idx: torch.tensor([local[int(idx[k])] for k in mine], dtype=torch.long,  # noqa: E731
                                            device=batch.leaves.device)
        return stats, to_local(winners), to_local(losers)

    def _errors(self, trainer, batch, points: dict, samples: torch.Tensor) -> torch.Tensor:
        """``ℓ`` per flow point of ``samples``, averaged over each sample's draws."""
        cond = batch.cond.select(batch.leaf_row.to(samples.device)[samples][points["owner"]])
        v = trainer.policy_velocity(points["x"], points["sigma"], cond)
        v_ref = trainer.policy_velocity(points["x"], points["sigma"], cond, reference=True)
        return relative_errors(v, v_ref, points["target"]).view(self.options.fm_draws, -1).mean(dim=0)

    def _dpo_sum(self, trainer, batch, winners: torch.Tensor, losers: torch.Tensor, salt: int) -> torch.Tensor:
        """Winner and loser of a pair see the same noise levels and noises (as Diffusion-DPO does)."""
        win = trainer.flow_points(batch, self.options.fm_draws, winners, salt)
        s = win["sigma"].view(-1, *([1] * (win["x"].ndim - 1)))
        eps = win["target"] + batch.leaves[winners][win["owner"]]
        x0_lose = batch.leaves[losers][win["owner"]]
        lose = {**win, "x": (1 - s) * x0_lose + s * eps, "target": eps - x0_lose}
        return dpo_loss(self._errors(trainer, batch, win, winners), self._errors(trainer, batch, lose, losers),
                        self.options.beta) * len(winners)

    def _kto_sum(self, trainer, batch, samples: torch.Tensor, positive: torch.Tensor, salt: int,
                 stand_in: bool = False) -> torch.Tensor:
        """KTO's reference point ``z_ref`` is the mean of ``h`` over every process's samples of the part."""
        points = trainer.flow_points(batch, self.options.fm_draws, samples, salt)
        errors = self._errors(trainer, batch, points, samples)
        mine = torch.stack([-errors.detach().sum(), torch.tensor(float(len(samples)), device=errors.device)])
        total = trainer.acc.reduce(mine * (0.0 if stand_in else 1.0), "sum")
        z_ref = (total[0] / total[1]).clamp(min=0)
        return kto_loss(errors, positive[samples], self.options.beta, z_ref) * len(samples)


# ---------------------------------------------------------------------------- the maths


def paired_sets(rewards: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group: the best sample (winner) and the worst (loser); groups whose samples tie are dropped."""
    winners, losers = [], []
    for g in groups.unique():
        rows = torch.nonzero(groups == g).squeeze(1)
        values = rewards[rows]
        if rows.numel() >= 2 and values.max() > values.min():
            winners.append(rows[values.argmax()])
            losers.append(rows[values.argmin()])
    if not winners:
        empty = torch.zeros(0, dtype=torch.long, device=rewards.device)
        return empty, empty
    return torch.stack(winners), torch.stack(losers)


def unpaired_sets(rewards: torch.Tensor) -> torch.Tensor:
    """True for D+ (strictly above the batch median), False for D- (at or below it)."""
    return rewards > rewards.median()


def greedy_set_swaps(set_reward: Callable[[torch.Tensor], float], pairs: torch.Tensor,
                     passes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Distribution rewards: ``pairs[i]`` holds two sample indices of prompt i; start with D+ = the firsts,
    D- = the seconds, and swap a pair's members whenever that raises ``set_reward(D+)`` (indices in, higher
    is better). Returns (D+ indices, D- indices), aligned pair by pair."""
    positive, negative = pairs[:, 0].clone(), pairs[:, 1].clone()
    best = set_reward(positive)
    for _ in range(passes):
        improved = False
        for i in range(len(pairs)):
            positive[i], negative[i] = negative[i].clone(), positive[i].clone()
            score = set_reward(positive)
            if score > best:
                best, improved = score, True
            else:
                positive[i], negative[i] = negative[i].clone(), positive[i].clone()
        if not improved:
            break
    return positive, negative


def relative_errors(v: torch.Tensor, v_ref: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``ℓ = mse(v_θ, u) - mse(v_ref, u)`` per sample (fp32)."""
    mse = lambda a: (a.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # noqa: E731
    return mse(v) - mse(v_ref)


def dpo_loss(errors_win: torch.Tensor, errors_lose: torch.Tensor, beta: float) -> torch.Tensor:
    """Diffusion-DPO for flow matching: ``-log σ(-β·(ℓ_w - ℓ_l))``, averaged over pairs."""
    return -F.logsigmoid(-beta * (errors_win - errors_lose)).mean()


def kto_loss(errors: torch.Tensor, positive: torch.Tensor, beta: float,
             z_ref: torch.Tensor | None = None) -> torch.Tensor:
    """Diffusion-KTO for flow matching on unpaired D+ (``positive``) and D- samples; ``z_ref`` defaults to the
    batch mean of ``h`` clamped at 0."""
    h = -errors
    z_ref = h.detach().mean().clamp(min=0) if z_ref is None else z_ref
    value = torch.where(positive, torch.sigmoid(beta * (h - z_ref)), torch.sigmoid(beta * (z_ref - h)))
    return (1 - value).mean()
