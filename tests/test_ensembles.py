"""Reward-model ensembles: each objective against a hand computation, per-member normalisation over the whole
batch (the same on 1 or 2 processes), skipped samples, tagged members and the config's one-line errors."""
from __future__ import annotations

import math

import pytest
import torch

from flowalign import rewards
from flowalign.config import load_config
from flowalign.rewards.ensemble import ensemble_score
from flowalign.typed import ConfigError

A, B = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 0.0, 3.0])


def test_objectives_by_hand():
    """Members a = (1, 2, 3), b = (3, 0, 3): mean (2, 1, 3), population variance (1, 1, 0), minimum (1, 0, 3)."""
    scores, equal = {"a": A, "b": B}, {"a": 1.0, "b": 1.0}
    assert ensemble_score(scores, equal, "mean").tolist() == [2.0, 1.0, 3.0]
    assert ensemble_score(scores, equal, "uncertainty_weighted", 0.5).tolist() == [1.5, 0.5, 3.0]
    assert ensemble_score(scores, equal, "worst_case").tolist() == [1.0, 0.0, 3.0]
    assert ensemble_score(scores, {"a": 2.0, "b": -1.0}, "weighted_sum").tolist() == [-1.0, 4.0, 3.0]
    # weights 3 : 1 -> shares 3/4, 1/4: mean (1.5, 1.5, 3); variance 3/4 (0.5)^2 + 1/4 (1.5)^2 = 0.75 for the first
    # two samples, 0 for the third; with penalty 2: (0, 0, 3)
    shares = {"a": 3.0, "b": 1.0}
    assert ensemble_score(scores, shares, "mean").tolist() == [1.5, 1.5, 3.0]
    assert ensemble_score(scores, shares, "uncertainty_weighted", 2.0).tolist() == [0.0, 0.0, 3.0]


def test_orderings_that_hold_for_any_scores():
    """UWO with penalty 0 is the mean; the worst case never exceeds the mean; UWO never exceeds the mean."""
    g = torch.Generator().manual_seed(0)
    scores = {f"m{k}": torch.randn(64, generator=g) for k in range(4)}
    weights = dict.fromkeys(scores, 1.0)
    mean = ensemble_score(scores, weights, "mean")
    assert torch.equal(ensemble_score(scores, weights, "uncertainty_weighted", 0.0), mean)
    assert (ensemble_score(scores, weights, "worst_case") <= mean).all()
    assert (ensemble_score(scores, weights, "uncertainty_weighted", 0.3) <= mean).all()


def composite(objective: str, normalize: str = "batch", penalty: float = 0.5) -> rewards.CompositeReward:
    return rewards.load_weighted({"toy/ink": 1.0, "toy/centered": 1.0}, normalize, objective, penalty)


def test_members_are_normalised_first():
    """a z-scored: (-1.2247, 0, 1.2247) (population std sqrt(2/3)); b: (0.7071, -1.4142, 0.7071) (std sqrt 2);
    the worst case takes the smaller of each pair."""
    out = composite("worst_case").combine({"toy/ink": A, "toy/centered": B})
    r = math.sqrt(1.5)
    assert out.tolist() == pytest.approx([-r, -math.sqrt(2), 1 / math.sqrt(2)], abs=1e-5)
    assert composite("worst_case").name == "worst_case(1*toy/ink+1*toy/centered)"


def test_normalisation_uses_the_whole_batch_across_processes():
    """Two processes holding half of the batch each, their statistics gathered, give each sample the score one
    process gives it holding all of it (running statistics included)."""
    whole = {"toy/ink": torch.tensor([0.1, 0.4, 0.2, 0.9]), "toy/centered": torch.tensor([1.0, 0.5, 0.7, 0.2])}
    halves = [{k: v[:2] for k, v in whole.items()}, {k: v[2:] for k, v in whole.items()}]
    for objective in ("mean", "uncertainty_weighted", "worst_case"):
        for normalize in ("batch", "running"):
            one = composite(objective, normalize).combine(whole)
            two = [composite(objective, normalize).combine(halves[0], gathering(halves[1], first=True)),
                   composite(objective, normalize).combine(halves[1], gathering(halves[0], first=False))]
            assert torch.allclose(torch.cat(two), one, atol=1e-6), (objective, normalize)


def gathering(other: dict[str, torch.Tensor], first: bool):
    """A stand-in for ``accelerator.gather`` on one of two processes: the parts are gathered in order."""
    parts = iter(other.values())
    return lambda mine: torch.cat([mine, next(parts)] if first else [next(parts), mine])


def test_a_skipped_sample_stays_out_of_the_statistics():
    """A NaN member score makes its sample NaN; the others are normalised over the three valid samples."""
    nan = float("nan")
    out = composite("mean").combine({"toy/ink": torch.tensor([1.0, 2.0, 3.0, 5.0]),
                                     "toy/centered": torch.tensor([3.0, 0.0, 3.0, nan])})
    r, h = math.sqrt(1.5), 1 / math.sqrt(2)
    assert math.isnan(out[3]) and out[:3].tolist() == pytest.approx([(-r + h) / 2, -h, (r + h) / 2], abs=1e-5)


def test_tagged_members_are_the_same_reward_with_their_own_options():
    """``toy/bold_digit#uncapped`` is another toy/bold_digit: its own options, its own name."""
    combo = rewards.load_weighted({"toy/bold_digit": 1.0, "toy/bold_digit#uncapped": 1.0}, "batch", "mean",
                                  **{"toy/bold_digit#uncapped": {"target_ink": 1.0}})
    capped, uncapped = combo.parts["toy/bold_digit"], combo.parts["toy/bold_digit#uncapped"]
    assert (capped.target_ink, uncapped.target_ink) == (0.45, 1.0) and uncapped.name == "toy/bold_digit#uncapped"
    assert not rewards.registry.known("toy/nothing#1") and rewards.registry.known("pickscore#2")


@pytest.mark.parametrize("overrides, message", [
    (["reward.objective=worst_case"], "reward.objective=worst_case compares its members after per-member "
     "normalisation: set reward.normalize to batch or running"),
    (["reward.objective=mean", "reward.normalize=batch"], "reward.weights names the ensemble's members, expected 2"),
    (["reward.objective=worst_case", "reward.normalize=batch", "reward.weights={toy/ink: 1, toy/size: 2}"],
     "reward.objective=worst_case takes the smallest member score: give every member the same weight"),
    (["reward.objective=mean", "reward.normalize=batch", "reward.weights={toy/ink: 1, toy/size: -1}"],
     "reward.weights are the members' shares, expected each above 0"),
    (["reward.objective=mean", "reward.normalize=batch", "reward.weights={toy/ink: 1, toy/size: 1}",
      "reward.aggregate=advantage"], "reward.objective=mean forms one score per sample from its members: use "
     "reward.aggregate=reward"),
    (["reward.objective=median"], "reward.objective"),
    (["reward.weights={toy/ink#a: 1, toy/nothing#b: 1}"], "unknown reward 'toy/nothing#b'"),
])
def test_bad_ensembles_are_one_line_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("configs/toy/digits_flow_grpo.yaml", [*overrides, f"output_dir={tmp_path}"])
