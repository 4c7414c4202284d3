"""Scoring while sampling goes on (``reward.overlap_prompts``): the same training as scoring after sampling, parts
really scored while later parts sample, and ``reward.on_error`` applied part by part."""
import threading

import pytest
import torch

from flowalign import rewards
from flowalign.config import load_config
from flowalign.errors import FlowalignError
from flowalign.training import make_trainer

SMALL = ["train.prompts_per_iteration=4", "train.steps=6", "train.eval_prompts=0", "train.checkpoint_every=0",
         "train.iterations=2"]
CASES = {"flow_grpo": ("configs/toy/digits_flow_grpo.yaml", ["flow_grpo.group_size=4"]),
         "tree_grpo": ("configs/toy/digits_tree_grpo.yaml", ["tree_grpo.tree_depth=2", "tree_grpo.window_size=2"]),
         "mix_grpo_flash": ("configs/toy/digits_mix_grpo_flash.yaml", ["mix_grpo.group_size=4"]),
         "dragon": ("configs/toy/digits_dragon.yaml", [])}


def _trainer(tmp_path, config: str, *overrides: str):
    return make_trainer(load_config(config, [*SMALL, f"output_dir={tmp_path}", *overrides]))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_scoring_while_sampling_trains_as_scoring_afterwards(tmp_path, case):
    """Parts of one prompt each, scored as they finish: the same rewards and the same weights after two
    iterations (the transitions are stored in the order one pass over all prompts stores them)."""
    config, extra = CASES[case]
    runs = {}
    for parts in (0, 1):
        tr = _trainer(tmp_path / str(parts), config, *extra, f"reward.overlap_prompts={parts}")
        history = tr.fit(progress=False)
        runs[parts] = ([h["reward/mean"] for h in history], [p.detach().clone() for p in tr.params])
    (rewards_after, weights_after), (rewards_overlap, weights_overlap) = runs[0], runs[1]
    assert rewards_after == pytest.approx(rewards_overlap, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(weights_after, weights_overlap))
    assert any(not torch.equal(a, torch.zeros_like(a)) for a in weights_after)


def test_a_part_is_scored_while_the_last_part_samples(tmp_path):
    """The last part's sampling waits until the reward has been called for the first part: with scoring after
    sampling the reward would not be called yet and the wait would time out."""
    tr = _trainer(tmp_path, *CASES["flow_grpo"][:1], *CASES["flow_grpo"][1], "reward.overlap_prompts=1",
                  "train.iterations=1")
    scored, seen, starts = threading.Event(), [], []
    score_all, initial_states = tr.reward.score_all, tr.initial_states

    def scoring(media, prompts=None, metadata=None):
        scored.set()
        seen.append(len(prompts))
        return score_all(media, prompts, metadata)

    def starting(iteration, keys, sigma):
        starts.append(len(keys))
        if len(starts) == 4:  # the last of 4 parts (one prompt of 4 trajectories each)
            starts.append(scored.wait(timeout=60))
        return initial_states(iteration, keys, sigma)

    tr.reward.score_all, tr.initial_states = scoring, starting
    tr.fit(progress=False)
    assert starts == [4, 4, 4, 4, True], starts
    assert seen == [4, 4, 4, 4]


def test_reward_failures_are_handled_part_by_part(tmp_path):
    """``skip``: only the failing part's samples are NaN (and train with advantage 0); ``stop``: one line."""
    calls = []

    def flaky(score_all):
        def score(media, prompts=None, metadata=None):  # fails on the second prompt's samples, however sent
            calls.append(len(prompts))
            if any(m["group"] == 1 for m in metadata):
                raise rewards.RewardError("reward toy/bold_digit: server answered 503")
            return score_all(media, prompts, metadata)
        return score

    skip = _trainer(tmp_path / "skip", *CASES["flow_grpo"][:1], *CASES["flow_grpo"][1], "reward.overlap_prompts=1",
                    "reward.on_error=skip", "train.iterations=1", "train.updates_per_iteration=1")
    skip.reward.score_all = flaky(skip.reward.score_all)
    _, batch = skip.run_iteration(0)
    nan = torch.isnan(batch.rewards)
    assert int(nan.sum()) == 4 and bool(torch.isfinite(batch.rewards[~nan]).all())
    assert bool((batch.leaf_advantages[nan] == 0).all()) and bool((batch.leaf_advantages[~nan] != 0).any())
    calls.clear()
    stop = _trainer(tmp_path / "stop", *CASES["flow_grpo"][:1], *CASES["flow_grpo"][1], "reward.overlap_prompts=1",
                    "train.iterations=1")
    stop.reward.score_all = flaky(stop.reward.score_all)
    with pytest.raises(FlowalignError, match=r"^reward failed at iteration 0 \(reward toy/bold_digit: server "
                                             r"answered 503\); stopping"):
        stop.run_iteration(0)


def test_set_rewards_cannot_be_scored_part_by_part(tmp_path):
    from flowalign.config import ConfigError

    with pytest.raises(ConfigError, match="reward.overlap_prompts: method dragon scores whole sets"):
        make_trainer(load_config("configs/toy/music_dragon_fad.yaml", ["reward.overlap_prompts=2",
                                                                       f"output_dir={tmp_path}"]))
