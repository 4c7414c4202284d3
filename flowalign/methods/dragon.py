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
    single_process = "its positive and negative sets span the whole batch"

    @classmethod
    def check(cls, options, train, modifiers) -> None:
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
        o = self.options
        groups = batch.leaf_row.to(batch.leaves.device)
        if o.sets == "greedy":
            stats, winners, losers = self._greedy_sets(trainer, batch, groups)
        elif o.sets == "paired":
            stats, (winners, losers) = {}, paired_sets(batch.rewards, groups)
        else:
            stats, positive = {}, unpaired_sets(batch.rewards)
        members = torch.arange(len(positive), device=positive.device) if o.sets == "unpaired" \
            else torch.cat([winners, losers])
        if len(members) == 0:
            return stats
        seed = derive_seed(self.train.seed, batch.iteration, 11)
        order = torch.randperm(len(members) if o.sets == "unpaired" else len(winners),
                               generator=torch.Generator().manual_seed(seed))
        losses, norms = [], []
        for salt, chunk in enumerate(order.chunk(self.train.updates_per_iteration)):
            chunk = chunk.to(members.device)
            if o.sets == "unpaired":
                loss = self._kto(trainer, batch, members[chunk], positive, salt)
            else:
                loss = self._dpo(trainer, batch, winners[chunk], losers[chunk], salt)
            trainer.acc.backward(loss)
            grad_norm = trainer.optimizer_step()
            losses.append(loss.item())
            if grad_norm is not None:
                norms.append(float(grad_norm))
        stats["dragon_loss"] = sum(losses) / len(losses)
        if norms:
            stats["grad_norm"] = sum(norms) / len(norms)
        stats["pairs"] = float(len(members) // (1 if o.sets == "unpaired" else 2))
        return stats

    def _greedy_sets(self, trainer, batch, groups):
        """Set rewards: each prompt's pair swapped between D+ and D- while that raises the set reward of D+."""
        part = next(iter(trainer.reward.parts.values()))
        pairs = torch.stack([torch.nonzero(groups == g).squeeze(1)[:2] for g in groups.unique()])
        set_reward = lambda idx: float(part.score_set(batch.media[idx]))  # noqa: E731
        stats = {"reward/set_before": set_reward(pairs[:, 0])}
        winners, losers = greedy_set_swaps(set_reward, pairs)
        stats["reward/set_positive"] = set_reward(winners)
        stats["reward/mean"], stats["reward/std"] = float(part.score_set(batch.media)), 0.0
        return stats, winners, losers

    def _errors(self, trainer, batch, points: dict, samples: torch.Tensor) -> torch.Tensor:
        """``ℓ`` per flow point of ``samples``, averaged over each sample's draws."""
        cond = batch.cond.select(batch.leaf_row.to(samples.device)[samples][points["owner"]])
        v = trainer.policy_velocity(points["x"], points["sigma"], cond)
        v_ref = trainer.policy_velocity(points["x"], points["sigma"], cond, reference=True)
        return relative_errors(v, v_ref, points["target"]).view(self.options.fm_draws, -1).mean(dim=0)

    def _dpo(self, trainer, batch, winners: torch.Tensor, losers: torch.Tensor, salt: int) -> torch.Tensor:
        """Winner and loser of a pair see the same noise levels and noises (as Diffusion-DPO does)."""
        win = trainer.flow_points(batch, self.options.fm_draws, winners, salt)
        s = win["sigma"].view(-1, *([1] * (win["x"].ndim - 1)))
        eps = win["target"] + batch.leaves[winners][win["owner"]]
        x0_lose = batch.leaves[losers][win["owner"]]
        lose = {**win, "x": (1 - s) * x0_lose + s * eps, "target": eps - x0_lose}
        return dpo_loss(self._errors(trainer, batch, win, winners), self._errors(trainer, batch, lose, losers),
                        self.options.beta)

    def _kto(self, trainer, batch, samples: torch.Tensor, positive: torch.Tensor, salt: int) -> torch.Tensor:
        points = trainer.flow_points(batch, self.options.fm_draws, samples, salt)
        return kto_loss(self._errors(trainer, batch, points, samples), positive[samples], self.options.beta)


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


def kto_loss(errors: torch.Tensor, positive: torch.Tensor, beta: float) -> torch.Tensor:
    """Diffusion-KTO for flow matching on unpaired D+ (``positive``) and D- samples."""
    h = -errors
    z_ref = h.detach().mean().clamp(min=0)
    value = torch.where(positive, torch.sigmoid(beta * (h - z_ref)), torch.sigmoid(beta * (z_ref - h)))
    return (1 - value).mean()
