"""Groupwise rewards: the rank-to-reward rule by hand, a ranking judge's groups, ``rank`` in a composite, and a toy
Flow-GRPO run on ``rank`` (whole prompts per process, each group's rewards its ranks)."""
from __future__ import annotations

import math

import pytest
import torch

from flowalign import rewards
from flowalign.checks import check_training
from flowalign.config import ConfigError, load_config
from flowalign.rewards import GroupwiseReward, RewardError
from flowalign.rewards.groupwise import group_indices, rank_rewards
from flowalign.rewards.registry import describe
from flowalign.training import make_trainer

FLOW = "configs/toy/digits_flow_grpo.yaml"
SMALL = ["train.prompts_per_iteration=2", "flow_grpo.group_size=4", "train.steps=4", "train.eval_prompts=0",
         "train.rollout_batch=8", "train.train_batch=8", "train.checkpoint_every=0", "train.iterations=1",
         "train.updates_per_iteration=1", "reward.weights={rank: 1.0}",
         "reward.options={rank: {reward: toy/bold_digit}}"]


def levels(*values: float) -> torch.Tensor:
    """Flat grey images, one per value: toy/ink (the mean ink) reads the value itself."""
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()


@pytest.mark.parametrize("scores, groups, expected", [
    # G = 4: ranks 3, 0, 1, 2 -> (3 - rank) / 3
    ([0.1, 0.9, 0.5, 0.3], [0, 0, 0, 0], [0.0, 1.0, 2 / 3, 1 / 3]),
    # the two 0.7s share ranks 0 and 1 -> 0.5 each -> (3 - 0.5) / 3
    ([0.2, 0.7, 0.7, 0.1], [0, 0, 0, 0], [1 / 3, 5 / 6, 5 / 6, 0.0]),
    # two groups ranked apart; a group of one gets 0.5
    ([5.0, -1.0, 2.0, 0.0, 9.0, 3.0], [0, 0, 0, 1, 1, 2], [1.0, 0.0, 0.5, 0.0, 1.0, 0.5]),
    ([1.0, 1.0, 1.0], [7, 7, 7], [0.5, 0.5, 0.5]),  # all tied
])
def test_rank_to_reward_rule_by_hand(scores, groups, expected):
    index = group_indices([""] * len(groups), [{"group": g} for g in groups])
    assert rank_rewards(torch.tensor(scores), index).tolist() == pytest.approx(expected)


class BrightnessJudge(GroupwiseReward):
    """A stand-in for a judge that ranks N images: rank 0 for the brightest, ties given the same rank."""

    name = "test/brightness"
    returns = "ranks"

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def _rank(self, media, prompt, metadata):
        self.calls.append((prompt, media.shape[0]))
        mean = media.mean(dim=(1, 2, 3))
        return (mean[None, :] > mean[:, None]).sum(dim=1).float()  # how many are brighter


def test_a_ranking_judge_sees_whole_groups():
    judge = BrightnessJudge()
    media = levels(0.1, 0.9, 0.5, 0.5, 0.2, 0.8)
    prompts = ["a"] * 4 + ["b"] * 2
    scores = judge.score(media, prompts)  # no group ids: a prompt's samples form a group
    assert scores.tolist() == pytest.approx([0.0, 1.0, 0.5, 0.5, 0.0, 1.0])
    assert judge.calls == [("a", 4), ("b", 2)]
    groups = [{"group": g} for g in [3, 3, 3, 3, 1, 1]]
    assert judge.score(media, ["a"] * 4 + ["b"] * 2, groups).tolist() == pytest.approx(scores.tolist())
    with pytest.raises(RewardError, match="reward test/brightness: group 1 holds samples of different prompts"):
        judge.score(media, ["a"] * 4 + ["b", "c"], groups)
    judge.batch_size = 2  # a group is never cut into chunks
    assert judge.score(media, prompts).tolist() == pytest.approx(scores.tolist())


def test_a_judge_returning_the_wrong_count_or_nan_is_one_line():
    class Short(BrightnessJudge):
        def _rank(self, media, prompt, metadata):
            return super()._rank(media, prompt, metadata)[:-1]

    class Broken(BrightnessJudge):
        def _rank(self, media, prompt, metadata):
            return super()._rank(media, prompt, metadata) * float("nan")

    with pytest.raises(RewardError, match="reward test/brightness: 3 ranks for a group of 4"):
        Short().score(levels(0.1, 0.2, 0.3, 0.4))
    with pytest.raises(RewardError, match="reward test/brightness: non-finite score nan for sample 0"):
        Broken().score(levels(0.1, 0.2))


def test_rank_in_a_weighted_composite():
    """``rank`` of toy/ink beside toy/ink itself: 2·rank + 0.5·ink, the ranks written out by hand."""
    mix = rewards.load_weighted({"rank": 2.0, "toy/ink": 0.5}, rank={"reward": "toy/ink"})
    media = levels(0.1, 0.9, 0.5, 0.3, 0.6, 0.2)
    groups = [{"group": g} for g in [0, 0, 0, 0, 1, 1]]
    ranks = torch.tensor([0.0, 1.0, 2 / 3, 1 / 3, 1.0, 0.0])
    total, parts = mix.score_parts(media, ["a seven"] * 6, groups)
    torch.testing.assert_close(parts["rank"], ranks)
    torch.testing.assert_close(total, 2 * ranks + 0.5 * torch.tensor([0.1, 0.9, 0.5, 0.3, 0.6, 0.2]))
    assert mix.whole_groups and not mix.differentiable
    assert describe("rank")["kind"] == "groupwise" and describe("toy/preference")["kind"] == "pairwise"
    with pytest.raises(RewardError, match="reward 'rank': cannot load"):
        rewards.load("rank", reward=rewards.load("toy/ink"), target=0.5)


def test_a_toy_flow_grpo_run_trains_on_ranks(tmp_path):
    """Each group's rewards are its ranks under toy/bold_digit (sorted: 0, 1/3, 2/3, 1); a prompt's samples stay
    on one process; one iteration trains, and the mean reward of a group of ranks is 0.5."""
    with pytest.raises(ConfigError, match="reward rank keeps a prompt's samples on one process"):
        check_training(load_config(FLOW, [*SMALL, "train.prompts_per_iteration=3"]), 2)
    tr = make_trainer(load_config(FLOW, [*SMALL, f"output_dir={tmp_path / 'run'}"]))
    assert tr.whole_prompts
    batch = tr.rollout(0)
    tr.score(batch)
    bold = rewards.load("toy/bold_digit").score(batch.media, batch.leaf_prompts, batch.leaf_metadata())
    for group in batch.leaf_groups.unique():
        members = (batch.leaf_groups == group).nonzero().flatten()
        ordered = batch.rewards[members][bold[members].argsort()]
        torch.testing.assert_close(ordered, torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    history = tr.fit(progress=False)
    assert history[0]["reward/mean"] == pytest.approx(0.5) and math.isfinite(history[0]["policy_loss"])
