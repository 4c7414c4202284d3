"""The parts every forward-process method has: on-policy ODE samples, scored, then a flow-matching
objective at fresh noise levels. No SDE log-probs: any solver samples, and CFG-free training is possible.
The trainer (``flowalign.training.flow_matching``) samples and scores; the method's ``update`` trains."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from ..algorithms.grpo.advantages import group_advantages
from ..typed import bounded
from .base import Method, require


@dataclass
class FlowMatchingOptions:
    group_size: int = bounded(4, min=1, doc="ODE samples per prompt")
    fm_draws: int = bounded(4, min=1, doc="noise levels drawn per sample for the flow-matching loss")
    fm_sigma: Literal["uniform", "logit_normal", "grid"] = bounded(
        "uniform", doc="how those noise levels are drawn: uniform in (0, 1), logit-normal, or distinct levels of "
        "the sampling grid (sigmas[0..steps-1]) per sample")
    solver: Literal["euler", "dpm_solver"] = bounded("euler", doc="the ODE solver the samples come from "
                                                     "(dpm_solver: DPM-Solver++ 2M)")


class FlowMatchingMethod(Method):
    """A forward-process method: ``update(trainer, batch)`` trains on the iteration's scored ODE samples."""

    family = "flow_matching"

    @classmethod
    def check(cls, options, train, modifiers) -> None:
        require(options.fm_sigma != "grid" or options.fm_draws <= train.steps, f"{cls.name}.fm_draws: "
                f"{options.fm_draws} distinct levels of the sampling grid need train.steps >= {options.fm_draws} "
                f"(train.steps={train.steps})")

    @property
    def scores_pointwise(self) -> bool:
        """Whether the trainer scores each sample before ``update`` (False: the method scores sets itself)."""
        return True

    def noise_levels(self, grid: torch.Tensor, draws: int, generator: torch.Generator) -> torch.Tensor:
        """One sample's ``draws`` noise levels for its flow points (``grid``: the sampling grid without its final
        0), as ``fm_sigma`` says."""
        kind = self.options.fm_sigma
        if kind == "logit_normal":
            return torch.sigmoid(torch.randn(draws, generator=generator))
        if kind == "grid":
            return grid[torch.randperm(len(grid), generator=generator)[:draws]]
        return torch.rand(draws, generator=generator)

    def sampling_weights(self, trainer) -> contextlib.AbstractContextManager:
        """The weights the samples come from (a lagged copy for DiffusionNFT); the policy's by default."""
        return contextlib.nullcontext()

    def update(self, trainer, batch) -> dict[str, float]:
        """Train on ``batch`` (samples, rewards); returns statistics to log."""
        raise NotImplementedError


def group_scores(trainer, batch, group_size: int, std: Literal["global", "group"],
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's samples' group z-scores over every process's rewards (a group: ``group_size`` consecutive
    sample ids), and which samples were scored (a skipped one gets 0)."""
    position = trainer.gathered(batch.rewards, batch)[1]
    rewards = batch.all_rewards
    valid = torch.isfinite(rewards)
    adv = torch.zeros_like(rewards, dtype=torch.float32)
    if bool(valid.any()):
        groups = torch.arange(len(rewards), device=rewards.device) // group_size
        adv[valid] = group_advantages(rewards[valid], groups[valid], std, eps)
    return adv[position], valid[position]


def reward_group_scores(trainer, batch, group_size: int, std: Literal["global", "group"],
                        eps: float) -> dict[str, torch.Tensor]:
    """Each reward's own group z-scores of this process's samples (MARBLE; every sample is scored)."""
    out = {}
    for name, part in batch.reward_parts.items():
        values, position = trainer.gathered(part, batch)
        groups = torch.arange(len(values), device=values.device) // group_size
        out[name] = group_advantages(values.float(), groups, std, eps)[position]
    return out


def require_lora_for(method: str, weight: float, train) -> None:
    """A distance to the LoRA-off base needs a LoRA (one line naming the option)."""
    require(train.lora_rank > 0 or weight == 0, f"{method}.kl_weight compares with the LoRA-off base: it needs "
            "train.lora_rank > 0 (or kl_weight 0)")
