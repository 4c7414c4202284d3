"""The one object an iteration's stages pass along: sampling fills it, scoring adds rewards, the method adds
advantages, the update reads it. Nothing travels beside it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..generators.base import Conditioning
from ..samplers.rollout import Rollout


@dataclass
class IterationBatch:
    """This process's share of one iteration.

    Leaves are the finished samples. ``leaf_ids`` are unique across processes and give the order in which
    gathered rewards are laid out; ``leaf_groups`` name the comparison group each leaf's advantage is
    normalised in (a prompt's trajectories, or one (prompt, step) set of branches): both are global."""

    iteration: int
    prompts: list[str]                  # the iteration's prompts (the same on every process)
    metadata: list[dict]                # per prompt (e.g. the toy digit), for rewards
    cond: Conditioning                  # the encoded prompts, row i = prompts[i]
    leaves: torch.Tensor                # [L, *latent] final latents
    leaf_row: torch.Tensor              # [L] the prompt row of each leaf
    leaf_ids: torch.Tensor              # [L] global leaf ids
    leaf_groups: torch.Tensor           # [L] global group ids
    nfe: int                            # model evaluations of this process's sampling
    rollout: Rollout | None = None      # the stored SDE transitions (policy-gradient methods)
    media: torch.Tensor | None = None   # [L, ...] decoded leaves
    rewards: torch.Tensor | None = None                     # [L] weighted reward (NaN: a skipped sample)
    reward_parts: dict[str, torch.Tensor] = field(default_factory=dict)   # [L] each reward's raw score
    all_rewards: torch.Tensor | None = None                 # every process's rewards, ordered by leaf id
    leaf_advantages: torch.Tensor | None = None             # [L]
    advantages: torch.Tensor | None = None                  # [T] per stored transition
    extras: dict[str, Any] = field(default_factory=dict)    # per-iteration data of modifiers, by name

    @property
    def leaf_prompts(self) -> list[str]:
        return [self.prompts[r] for r in self.leaf_row.tolist()]

    def leaf_metadata(self) -> list[dict]:
        """Each leaf's prompt metadata plus its ``group`` (pairwise rewards judge within groups)."""
        return [{**self.metadata[r], "group": g} for r, g in zip(self.leaf_row.tolist(), self.leaf_groups.tolist())]
