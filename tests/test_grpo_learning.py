"""Flow-GRPO and DanceGRPO learn on the toy world: "bold digits" (classifier probability x capped ink)
rises on held-out prompts (phrasings never trained on) and held-out seeds, far above the seed spread.

Measured (2 CPU cores, 15-30 s each): base 0.664; Flow-GRPO -> 0.876 (+0.212), DanceGRPO -> 0.819 (+0.156),
GRPO-Guard -> 0.909 (+0.245) after 16 iterations of 4 groups x 8; TempFlow-GRPO -> 0.797 (+0.134),
G²RPO -> 0.735 (+0.071), Dynamic-TreeRPO (with dynamic clipping) -> 0.932 (+0.269) with their configs' group
layouts; the std of the
base model's mean over 4 evaluation seeds is 0.004.
"""
import pytest
import torch

import flowalign
from flowalign import rewards
from flowalign.training.report import EVAL_SEED, heldout_prompts
from flowalign.training.run import train

pytestmark = pytest.mark.slow  # learning runs / process launches: the full suite only

BUDGET = ["train.iterations=16", "train.prompts_per_iteration=4", "train.steps=8",
          "train.eval_prompts=60", "train.eval_steps=10", "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def seed_spread():
    """Std of the base model's mean reward over 4 evaluation seeds (same prompts, steps, CFG)."""
    gen = flowalign.load_generator("toy/digits", device="cpu")
    reward = rewards.load("toy/bold_digit")
    prompts, meta = heldout_prompts(60, None)
    means = [reward.score(flowalign.generate(gen, prompts, steps=10, guidance=3.0, seed=EVAL_SEED + k),
                          prompts, meta).mean() for k in range(4)]
    return torch.stack(means).std().item()


@pytest.mark.parametrize("config, min_gain", [("configs/toy/digits_flow_grpo.yaml", 0.1),
                                              ("configs/toy/digits_dance_grpo.yaml", 0.08),
                                              ("configs/toy/digits_grpo_guard.yaml", 0.1),
                                              ("configs/toy/digits_tempflow_grpo.yaml", 0.06),
                                              ("configs/toy/digits_g2rpo.yaml", 0.04),
                                              ("configs/toy/digits_tree_grpo.yaml", 0.1),
                                              ("configs/toy/digits_dr_grpo.yaml", 0.1)])
def test_reward_rises_well_above_seed_spread(tmp_path, seed_spread, config, min_gain):
    metrics = train(config, BUDGET + [f"output_dir={tmp_path}"], progress=False, print_fn=lambda *_: None)
    gain = metrics["reward_after"] - metrics["reward_before"]
    assert seed_spread < 0.01
    assert gain > min_gain and gain > 5 * seed_spread, (gain, seed_spread)


def test_cps_learns_with_the_anchors_log_prob(tmp_path, seed_spread):
    """Flow-GRPO with CPS noise (a 0.8) and Flow-GRPO's CPS log-prob ``-mean((x'-mu)^2)`` (the default):
    measured 0.664 -> 0.91 in 12 iterations (python -m benchmarks.grpo). With the exact Gaussian log-prob the
    1/std^2 of the last steps dominates and runs stall or collapse (0.65, 0.39 on two seeds)."""
    metrics = train("configs/toy/digits_flow_grpo.yaml", BUDGET + ["modifiers.cps.noise_level=0.8",
                                                                    f"output_dir={tmp_path}"],
                    progress=False, print_fn=lambda *_: None)
    gain = metrics["reward_after"] - metrics["reward_before"]
    assert gain > 0.1 and gain > 5 * seed_spread, (gain, seed_spread)


def test_mix_grpo_learns_two_rewards_with_advantage_aggregation(tmp_path, seed_spread):
    """MixGRPO (sliding SDE window, per-reward advantages summed): bold digits + centring both on held-out
    prompts and seeds. Measured: 1.488 -> 1.580 (+0.092) in 16 iterations."""
    metrics = train("configs/toy/digits_mix_grpo.yaml", BUDGET + [f"output_dir={tmp_path}"], progress=False,
                    print_fn=lambda *_: None)
    assert metrics["reward_after"] - metrics["reward_before"] > max(0.04, 5 * seed_spread)


def test_mix_grpo_window_and_aggregation():
    from flowalign.algorithms.grpo.advantages import aggregated_advantages, group_advantages
    from flowalign.config import load_config
    from flowalign.methods import build

    cfg = load_config("configs/toy/digits_mix_grpo.yaml")
    method = build(cfg.method, cfg.options, cfg.train, cfg.modifiers)
    windows = [method.sde_window(i) for i in range(0, 30, 3)]
    assert windows[:3] == [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]]  # slides by 1 every 3 iterations
    assert max(max(w) for w in windows) < cfg.train.steps - 2
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    big, small = torch.tensor([100.0, 200, 300, 1, 2, 3]), torch.tensor([0.3, 0.2, 0.1, 0.1, 0.2, 0.3])
    agg = aggregated_advantages({"big": big, "small": small}, {"big": 1.0, "small": 1.0}, groups, std="group")
    assert torch.allclose(agg,
                          group_advantages(big, groups, std="group") + group_advantages(small, groups, std="group"))
    assert torch.allclose(agg[:3], torch.zeros(3), atol=1e-2)  # opposite rankings cancel, whatever the scales


def test_pref_grpo_moves_the_judges_hidden_utility(tmp_path):
    """Pref-GRPO: rewards are win rates of every pair in a group under the toy preference model (trained on
    "bolder and better centred wins"), mixed with the classifier. The hidden utility (ink + centring) rises on
    held-out prompts and seeds. Measured: 1.126 -> 1.294 (+0.17) in 16 iterations; digit accuracy 1.00 -> 0.88."""
    from flowalign.config import load_config
    from flowalign.training import make_trainer
    from flowalign.training.report import evaluate_policy

    tr = make_trainer(load_config("configs/toy/digits_pref_grpo.yaml", BUDGET + [f"output_dir={tmp_path}"]))
    utility = rewards.load_weighted({"toy/ink": 1.0, "toy/centered": 1.0})
    prompts, meta = heldout_prompts(60, None)
    before = evaluate_policy(tr.gen, utility, prompts, meta, 10, 3.0)[1].mean().item()
    tr.fit(progress=False)
    media, after = evaluate_policy(tr.gen, utility, prompts, meta, 10, 3.0)
    assert after.mean().item() - before > 0.08
    assert rewards.load("toy/digit_match").score(media, prompts, meta).mean() >= 0.75


def test_tree_node_advantages_per_depth():
    """A node's reward is the mean of the leaves below it, normalised among its prompt-and-depth peers."""
    from flowalign.algorithms.grpo.advantages import node_advantages

    node_leaves = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1],
                                [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    node_group = torch.tensor([0, 1, 1, 2, 2, 2, 2])
    adv = node_advantages(torch.tensor([1.0, 3.0, 5.0, 7.0]), node_leaves, node_group, std="group", eps=1e-4)
    assert adv[0] == 0  # the root is alone in its group
    assert torch.allclose(adv[1:3], torch.tensor([-1.0, 1.0]), atol=1e-3)  # means 2 and 6
    leaf_z = (torch.tensor([1.0, 3, 5, 7]) - 4) / torch.tensor([1.0, 3, 5, 7]).std(unbiased=False)
    assert torch.allclose(adv[3:], leaf_z, atol=1e-3)
