"""Groupwise rewards: a whole group of one prompt's samples is judged at once and its ranking becomes the rewards
(a judge that orders N images, a pointwise score ranked within its group: ``rank``), see docs/rewards.md.

Rewards from ranks are bounded and free of the scorer's scale: every group's rewards are spread over [0, 1] the
same way, however close or far apart its raw scores are.
"""
from __future__ import annotations

from typing import Literal

import torch

from .base import Reward, check_finite
from .errors import RewardError


def group_indices(prompts: list[str], metadata: list[dict]) -> dict[object, list[int]]:
    """Sample indices by group: ``metadata[i]["group"]`` where given (the trainer sets it), else the prompt."""
    groups: dict[object, list[int]] = {}
    for i, (prompt, meta) in enumerate(zip(prompts, metadata)):
        key = ("group", meta["group"]) if "group" in meta else ("prompt", prompt)
        groups.setdefault(key, []).append(i)
    return groups


def rank_rewards(order: torch.Tensor, groups: dict[object, list[int]]) -> torch.Tensor:
    """Each sample's reward from its rank in its group of G: ``(G - 1 - rank) / (G - 1)`` in [0, 1], rank 0 for the
    highest ``order`` value, tied samples sharing the mean of their ranks; 0.5 for a sample alone in its group.
    The same number as its win rate against the rest of its group, a tie counting 1/2: a group's mean is 0.5."""
    rewards = torch.full_like(order, 0.5, dtype=torch.float32)
    for members in groups.values():
        if len(members) < 2:
            continue
        index = torch.tensor(members, device=order.device)
        values = order[index].float()
        beaten = (values[:, None] > values[None, :]).sum(dim=1)
        ties = (values[:, None] == values[None, :]).sum(dim=1) - 1
        rewards[index] = (beaten + 0.5 * ties).float() / (len(members) - 1)
    return rewards


class GroupwiseReward(Reward):
    """A reward that judges a group of one prompt's samples at once and is scored by the ranking it gives.

    A subclass implements ``_rank(media, prompt, metadata) -> Tensor[G]`` for one group (its media already
    checked, on the reward's device and in its dtype, never cut into chunks): scores, higher is better
    (``returns = "scores"``), or ranks, 0 for the best (``returns = "ranks"``); ties are allowed. ``score`` splits
    the batch into groups (``metadata[i]["group"]``, else samples of one prompt form a group) and gives each sample
    ``(G - 1 - rank) / (G - 1)`` (``rank_rewards``). Not differentiable: a ranking has no gradient."""

    whole_groups = True
    differentiable = False
    #: What ``_rank`` returns: ``scores`` (higher is better) or ``ranks`` (0 is the best).
    returns: Literal["scores", "ranks"] = "scores"

    def _rank(self, media: torch.Tensor, prompt: str, metadata: list[dict]) -> torch.Tensor:
        raise NotImplementedError

    def group_order(self, media: torch.Tensor, prompts: list[str], metadata: list[dict],
                    groups: dict[object, list[int]]) -> torch.Tensor:
        """One value per sample, higher for a better rank within its group (``_rank`` on each group in turn)."""
        device, dtype = self.device_dtype
        device, dtype = device or media.device, dtype or media.dtype
        order = torch.empty(media.shape[0], device=media.device)
        for key, members in groups.items():
            if len({prompts[i] for i in members}) > 1:
                raise RewardError(f"reward {self.name}: group {key[1]!r} holds samples of different prompts")
            index = torch.tensor(members, device=media.device)
            values = self._rank(media[index].to(device, dtype), prompts[members[0]], [metadata[i] for i in members])
            values = check_finite(values.detach().reshape(-1).float().to(media.device), self.name)
            if values.numel() != len(members):
                raise RewardError(f"reward {self.name}: {values.numel()} {self.returns} for a group of {len(members)}")
            order[index] = values if self.returns == "scores" else -values
        return order

    def score(self, media: torch.Tensor, prompts: list[str] | None = None,
              metadata: list[dict] | None = None) -> torch.Tensor:
        media = self.media_for(media)
        self.check_media(media)
        n = media.shape[0]
        prompts = list(prompts) if prompts is not None else [""] * n
        metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
        if len(prompts) != n or len(metadata) != n:
            raise RewardError(f"reward {self.name}: {n} samples but {len(prompts)} prompts, {len(metadata)} metadata")
        groups = group_indices(prompts, metadata)
        with torch.no_grad():
            order = self.group_order(media, prompts, metadata, groups)
        return rank_rewards(order, groups)


class RankReward(GroupwiseReward):
    """Any reward's scores ranked within each group: ``(G - 1 - rank) / (G - 1)``, ties sharing their mean rank.

    ``reward``: a reward name (its options are the remaining keyword arguments) or a ``Reward``. It scores the
    whole batch in one call; only the order within a group counts, so the rewards keep the ranking and drop the
    scale (a rank-based GRPO reward, as with PickScore-style rankings)."""

    name = "rank"

    def __init__(self, reward: str | Reward, **reward_kwargs):
        super().__init__()
        if isinstance(reward, str):
            from .registry import load

            reward = load(reward, **reward_kwargs)
        elif reward_kwargs:
            raise TypeError(f"rank: options {sorted(reward_kwargs)} are for a reward given by name")
        self.ranked = reward
        self.modality, self.input_spec = reward.modality, reward.input_spec

    def check_media(self, media) -> None:  # the ranked reward checks its own input
        if not isinstance(media, torch.Tensor):
            self.ranked.check_media(media)

    def group_order(self, media, prompts, metadata, groups):
        return self.ranked.score(media, prompts, metadata).detach()

    def _rank(self, media, prompt, metadata):
        return self.ranked.score(media, [prompt] * media.shape[0], metadata)
