"""The reward protocol's shared behaviour: input checks, non-finite scores, win rates, normalisation."""
import pytest
import torch

from flowalign import rewards
from flowalign.rewards import PairwiseReward, Reward, RewardError


class Mean(Reward):
    name = "test/mean"

    def _score(self, media, prompts, metadata):
        return media.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("media, expected", [
    (torch.rand(2, 3, 8), "expected image media of layout BCHW (4 dims), got shape (2, 3, 8)"),
    (torch.rand(2, 1, 8, 8), "expected 3 colour channels in BCHW, got shape (2, 1, 8, 8)"),
    (torch.rand(2, 3, 8, 8) * 2 - 1, "expected values in [0.0, 1.0], got [-"),
    (torch.randint(0, 255, (2, 3, 8, 8)), "expected floating-point media, got torch.int64"),
    ([1, 2], "expected a tensor of image media, got list"),
])
def test_bad_input_is_one_line(media, expected):
    with pytest.raises(RewardError) as err:
        Mean().score(media)
    assert expected in str(err.value) and str(err.value).startswith("reward test/mean:")
    assert "\n" not in str(err.value)


def test_non_finite_scores_name_the_sample():
    class Broken(Mean):
        def _score(self, media, prompts, metadata):
            out = super()._score(media, prompts, metadata).clone()
            out[2] = float("nan")
            return out

    with pytest.raises(RewardError, match="non-finite score nan for sample 2 \\(1 of 4 non-finite\\)"):
        Broken().score(torch.rand(4, 3, 8, 8))
    with pytest.raises(RewardError, match="4 samples but 3 prompts"):
        Mean().score(torch.rand(4, 3, 8, 8), ["a"] * 3)


def test_win_rate_within_groups_with_ties():
    class Brighter(PairwiseReward):
        name = "test/brighter"

        def _prefer(self, a, b, prompts):
            diff = a.mean(dim=(1, 2, 3)) - b.mean(dim=(1, 2, 3))
            return torch.where(diff.abs() < 1e-6, torch.full_like(diff, 0.5), (diff > 0).float())

    levels = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.2, 0.8])
    media = levels.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()
    groups = [{"group": g} for g in [0, 0, 0, 0, 1, 1]]
    wins = Brighter().score(media, None, groups)
    assert torch.allclose(wins, torch.tensor([0.0, 1.0, 0.5, 0.5, 0.0, 1.0]))
    assert torch.allclose(Brighter().prefer(media[:2], media[1:3]), torch.tensor([0.0, 1.0]))


def test_composite_normalisation():
    media = torch.rand(16, 3, 8, 8)
    batch = rewards.load_weighted({"toy/ink": 1.0, "toy/symmetry": 2.0}, normalize="batch")
    ink, sym = rewards.load("toy/ink").score(media), rewards.load("toy/symmetry").score(media)
    z = lambda s: (s - s.mean()) / (s.std(unbiased=False) + 1e-6)  # noqa: E731
    assert torch.allclose(batch.score(media), z(ink) + 2 * z(sym), atol=1e-4)
    running = rewards.load_weighted({"toy/ink": 1.0}, normalize="running")
    first = running.score(media)
    assert torch.allclose(first, z(ink), atol=1e-3)  # the first batch sets the statistics
    assert set(running.stats) == {"toy/ink"}


def test_pref_grpo_win_rates_do_not_invent_advantages():
    """Pref-GRPO's "illusory advantage": z-scoring near-identical pointwise scores spreads them to ±1.5, while
    a judge that calls indistinguishable pairs a tie gives equal win rates and no advantage at all."""
    from flowalign.algorithms.grpo.advantages import group_advantages

    class Judge(PairwiseReward):
        name = "test/judge"

        def _prefer(self, a, b, prompts):
            diff = a.mean(dim=(1, 2, 3)) - b.mean(dim=(1, 2, 3))
            return torch.where(diff.abs() < 0.01, torch.full_like(diff, 0.5), (diff > 0).float())

    levels = 0.5 + 1e-4 * torch.arange(8.0)  # scores that differ in the 4th decimal
    media = levels.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()
    groups = torch.zeros(8, dtype=torch.long)
    pointwise = group_advantages(levels, groups, std="group", eps=1e-8)
    win_rates = Judge().score(media, None, [{"group": 0}] * 8)
    pairwise = group_advantages(win_rates, groups, std="group", eps=1e-8)
    assert pointwise.abs().max() > 1.4 and torch.equal(win_rates, torch.full((8,), 0.5))
    assert pairwise.std() <= pointwise.std() and pairwise.abs().max() == 0


def test_a_judge_of_several_dimensions_gives_a_win_rate_each_combined_by_weights():
    """Three samples, pairs (0,1), (0,2), (1,2). Dimension A prefers the first of each pair with 1, 1, 0.5;
    dimension B with 0, 0.5, 1. Win rates by hand: A = [2/2, 0.5/2, 0.5/2] = [1, 0.25, 0.25],
    B = [0.5/2, 2/2, 0.5/2] = [0.25, 1, 0.25]; weights A 2, B 1: [(2 + 0.25)/3, (0.5 + 1)/3, (0.5 + 0.25)/3]."""
    table = {(0, 1): (1.0, 0.0), (0, 2): (1.0, 0.5), (1, 2): (0.5, 1.0)}

    class TwoAspects(PairwiseReward):
        name = "test/two-aspects"
        dimensions = ("aesthetics", "alignment")
        dimension_weights = {"aesthetics": 2.0}

        def _prefer(self, a, b, prompts):
            key = lambda x: round(float(x.flatten()[0]) * 10)  # noqa: E731 - sample i is filled with i/10
            return torch.tensor([table[(key(x), key(y))] for x, y in zip(a, b)])

    media = (torch.arange(3.0) / 10).view(3, 1, 1, 1).expand(3, 3, 2, 2).contiguous()
    judge = TwoAspects()
    assert torch.allclose(judge.win_rates(media), torch.tensor([[1.0, 0.25], [0.25, 1.0], [0.25, 0.25]]))
    assert torch.allclose(judge.score(media), torch.tensor([2.25 / 3, 1.5 / 3, 0.75 / 3]))
