"""The GRPO variants' own parts: LayerTuning-RL, MixGRPO-Flash, MixGRPO's window and advantage aggregation,
Dynamic-TreeRPO's per-depth advantages. Their learning is in test_learning.py."""
import re

import pytest
import torch

from flowalign.config import ConfigError, load_config
from flowalign.modifiers.layer_tuning import best_path_weights, velocity_targets
from flowalign.samplers.kernels import flow_grpo, step_mean
from flowalign.training import make_trainer

TREE = ["train.prompts_per_iteration=2", "train.steps=8", "train.eval_prompts=0", "train.checkpoint_every=0"]


def test_best_path_weights_pick_each_groups_best_leaf():
    rewards = torch.tensor([0.1, 0.9, 0.5, float("nan"), 0.2, 0.3])
    adv = torch.tensor([-1.0, 1.2, 0.1, 0.0, -0.5, 0.5])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    # transitions: a shared trunk over leaves 0-2, a private one per leaf, and a trunk over leaves 3-5
    below = torch.zeros(9, 6, dtype=torch.bool)
    below[0, :3] = True
    for leaf in range(6):
        below[1 + leaf, leaf] = True
    below[7, 3:] = True
    below[8, 3] = True  # only the NaN leaf (a skipped sample) is below it: never best
    w = best_path_weights(rewards, adv, groups, below, "advantage")
    assert torch.equal(w, torch.tensor([1.2, 0, 1.2, 0, 0, 0, 0.5, 0.5, 0]))
    assert torch.equal(best_path_weights(rewards, adv, groups, below, "uniform"),
                       torch.tensor([1.0, 0, 1, 0, 0, 0, 1, 1, 0]))
    flat = best_path_weights(torch.ones(3), torch.zeros(3), torch.zeros(3, dtype=torch.long),
                             torch.eye(3, dtype=torch.bool), "advantage")
    assert flat.sum() == 0  # a flat group has no best path worth imitating


def test_velocity_target_reproduces_the_step_taken():
    torch.manual_seed(0)
    x, x_next = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    sigma, sigma_next = torch.tensor([0.9, 0.7, 0.5, 0.3]), torch.tensor([0.8, 0.6, 0.4, 0.2])
    scale = torch.tensor([1.0, 1.5, 2.0, 1.0])
    target = velocity_targets(x, x_next, sigma, sigma_next, flow_grpo(0.7), scale)
    mean, _ = step_mean(target, x, sigma, sigma_next, flow_grpo(0.7), scale)
    torch.testing.assert_close(mean, x_next, rtol=1e-5, atol=1e-5)


def test_layer_tuning_pulls_the_policy_toward_the_best_path(tmp_path):
    """With zero advantages the policy loss has no gradient: the LayerTuning term alone must shrink the
    velocity error on the best paths, and only there (off-path transitions weigh 0)."""
    cfg = load_config("configs/toy/digits_tree_grpo.yaml", TREE + ["modifiers.layer_tuning.weight=1.0",
                                                                  "modifiers.layer_tuning.group_weight=uniform",
                                                                  f"output_dir={tmp_path}"])
    tr = make_trainer(cfg)
    batch = tr.rollout(0)
    tr.score(batch)
    tr.advantages(batch)
    batch.advantages = torch.zeros_like(batch.advantages)
    tr.method.modifiers["layer_tuning"].prepare(tr, batch)
    weights = batch.extras["layer_tuning"][0]
    rollout = batch.rollout
    assert 0 < int((weights > 0).sum()) < rollout.num_transitions
    idx = torch.arange(rollout.num_transitions)
    losses = []
    for _ in range(30):
        loss, stats = tr.loss(batch, idx, rollout.logp)
        tr.acc.backward(loss)
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        losses.append(stats["layer_tuning"].item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_flash_tail_is_respaced_and_shorter():
    from flowalign.methods import build

    cfg = load_config("configs/toy/digits_mix_grpo_flash.yaml", ["train.steps=10"])
    method = build(cfg.method, cfg.options, cfg.train, cfg.modifiers)
    sigmas = torch.linspace(1, 0, 11)
    window = method.sde_window(0)
    head, tail = method.modifiers["flash"].rollout_grid(sigmas, None, window)
    last = max(window)
    assert torch.equal(head, sigmas[:last + 2])
    assert len(tail) - 1 == max(int((10 - 1 - last) * 0.4), 1)
    assert tail[0] == sigmas[last + 1] and tail[-1] == 0
    assert torch.all(tail[1:] < tail[:-1])


def test_flash_rollout_counts_its_nfes(tmp_path):
    """Flash: the same window, fewer model passes after it (counted by the engine and the solver)."""
    over = ["train.steps=10", "train.prompts_per_iteration=2", "mix_grpo.group_size=4", "train.eval_prompts=0",
            "train.checkpoint_every=0", "train.guidance=1", f"output_dir={tmp_path}"]
    plain = make_trainer(load_config("configs/toy/digits_mix_grpo.yaml", over))
    flash = make_trainer(load_config("configs/toy/digits_mix_grpo_flash.yaml", over))
    last = max(flash.method.sde_window(0))
    r_plain, r_flash = plain.rollout(0).rollout, flash.rollout(0).rollout
    n = 8
    assert r_plain.nfe == n * 10
    assert r_flash.nfe == n * (last + 1 + max(int((10 - 1 - last) * 0.4), 1))
    assert torch.equal(r_plain.logp, r_flash.logp)  # the window itself is the same
    assert r_flash.leaves.shape == r_plain.leaves.shape and torch.isfinite(r_flash.leaves).all()
    # both end near the same images: the tail is an ODE solve of the same flow
    assert (r_flash.leaves - r_plain.leaves).abs().mean() < 0.25


@pytest.mark.parametrize("overrides, message", [
    (["modifiers.flash={}"], "modifiers.flash (MixGRPO-Flash) with method flow_grpo needs modifiers.fast"),
    (["method=tree_grpo", "flow_grpo=null", "modifiers.flash={}"], "modifiers.flash (MixGRPO-Flash) does not "
     "combine with method tree_grpo"),
    (["method=dance_grpo", "flow_grpo=null", "modifiers.fast={}"], "modifiers.fast (Flow-GRPO-Fast window) does not "
     "combine with method dance_grpo"),
])
def test_flash_needs_a_window(overrides, message):
    """Flash before never ran on a tree (silently); the Fast window silently replaced DanceGRPO's random steps."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("configs/toy/digits_flow_grpo.yaml", overrides)


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


def test_zero_advantage_transitions_can_be_dropped(tmp_path):
    """``drop_zero_advantage`` (Flow-GRPO's filter): a group whose rewards are all equal has advantage 0
    everywhere; its transitions (4 samples x 3 trained steps of train.steps=4 at fraction 0.99) leave the update
    and are counted. When every group is flat there is no update at all: the weights stay as they were."""
    from flowalign.training.lora import trainable_state

    def trainer(flat_prompts: str):
        cfg = load_config("configs/toy/digits_flow_grpo.yaml", [
            "train.prompts_per_iteration=2", "flow_grpo.group_size=4", "train.steps=4", "train.eval_prompts=0",
            "train.checkpoint_every=0", "flow_grpo.drop_zero_advantage=true", f"output_dir={tmp_path / flat_prompts}"])
        tr = make_trainer(cfg)
        part = tr.reward.parts["toy/bold_digit"]
        real = part._score

        def score(media, prompts, metadata):
            flat = torch.tensor([flat_prompts == "all" or p == prompts[0] for p in prompts])
            return torch.where(flat, torch.full((len(prompts),), 0.5), real(media, prompts, metadata))
        part._score = score
        return tr

    metrics, batch = trainer("first").run_iteration(0)
    assert batch.rollout.num_transitions == 24 and metrics["dropped_zero_advantage"] == 12.0
    assert int((batch.advantages == 0).sum()) == 12
    flat = trainer("all")
    before = {k: v.clone() for k, v in trainable_state(flat.gen.trainable_module, True).items()}
    metrics, _ = flat.run_iteration(0)
    assert metrics["dropped_zero_advantage"] == 24.0 and "policy_loss" not in metrics
    after = trainable_state(flat.gen.trainable_module, True)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_mix_grpo_trimmed_group_statistics_by_hand():
    """MixGRPO's trimmed_ratio 0.25 on a group [1, 2, 3, 10]: the lowest min(int(4·0.25), 3) = 1 reward leaves the
    statistics: mean(2, 3, 10) = 5, unbiased std sqrt((9 + 4 + 25) / 2) = sqrt(19) = 4.358899, so the advantages
    are [-4, -3, -2, 5] / 4.358899. A second group [0, 0, 1, 1] at ratio 0.25 keeps [0, 1, 1]: mean 2/3,
    std sqrt((4/9 + 1/9 + 1/9) / 2) = 0.5773503."""
    from flowalign.algorithms.grpo.advantages import trimmed_group_advantages

    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 0.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = trimmed_group_advantages(rewards, groups, 0.25, eps=1e-8)
    expected = torch.tensor([-4 / 4.358899, -3 / 4.358899, -2 / 4.358899, 5 / 4.358899,
                             -(2 / 3) / 0.5773503, -(2 / 3) / 0.5773503, (1 / 3) / 0.5773503, (1 / 3) / 0.5773503])
    assert torch.allclose(adv, expected, atol=1e-5)


def test_mix_grpo_window_dwells_on_an_empty_window_before_rolling_back(tmp_path):
    """MixGRPO's end of cycle: size 2 below step 4, one iteration per position: [0,1] [1,2] [2,3] [3] [] then
    back to [0,1]; without empty_dwell it rolls back straight after [3]. A run through the empty window samples
    (ODE only) and trains nothing that iteration."""
    from flowalign.samplers.windows import WindowSchedule

    paper = WindowSchedule("progressive", size=2, max_steps=4, dwell=1, stride=1, empty_dwell=True)
    assert [paper.steps(i, 6) for i in range(6)] == [[0, 1], [1, 2], [2, 3], [3], [], [0, 1]]
    plain = WindowSchedule("progressive", size=2, max_steps=4, dwell=1, stride=1)
    assert [plain.steps(i, 6) for i in range(5)] == [[0, 1], [1, 2], [2, 3], [3], [0, 1]]
    cfg = load_config("configs/toy/digits_mix_grpo.yaml", [
        "train.prompts_per_iteration=2", "mix_grpo.group_size=2", "train.steps=6", "train.eval_prompts=0",
        "train.checkpoint_every=0", "train.iterations=6", "mix_grpo.window_size=2", "mix_grpo.window_dwell=1",
        "mix_grpo.window_empty_dwell=true", "mix_grpo.trimmed_ratio=0.25", "mix_grpo.rerange=balance",
        f"output_dir={tmp_path}"])
    history = make_trainer(cfg).fit(progress=False)
    assert "policy_loss" not in history[4] and all("policy_loss" in h for i, h in enumerate(history) if i != 4)
    assert all(torch.isfinite(torch.tensor(h["reward/mean"])) for h in history)


def test_flash_paper_tail_by_hand():
    """MixGRPO-Flash's own tail: T = 25 on the shifted linspace (shift 3), window ending at step 3, fraction 0.4:
    int((25 - 3)·0.4) = 8 points of linspace(0.84, 0, 8) = 0.84, 0.72, ..., 0, each through 3t / (1 + 2t):
    [0.940299, 0.885246, 0.818182, 0.734694, 0.627907, 0.486486, 0.290323, 0]; the interpolated tail has
    int((25 - 1 - 3)·0.4) = 8 steps (9 points) along the grid instead."""
    from flowalign.modifiers.flash import Flash, FlashOptions
    from flowalign.samplers.timegrid import shifted_linspace

    sigmas = shifted_linspace(25, 3.0)
    kept, tail = Flash(FlashOptions(tail="paper"), None).rollout_grid(sigmas, None, [0, 1, 2, 3])
    expected = torch.tensor([0.940299, 0.885246, 0.818182, 0.734694, 0.627907, 0.486486, 0.290323, 0.0])
    assert torch.allclose(tail, expected, atol=1e-5) and torch.equal(kept, sigmas[:5])
    _, interpolated = Flash(FlashOptions(), None).rollout_grid(sigmas, None, [0, 1, 2, 3])
    assert len(interpolated) == 9 and interpolated[0] == sigmas[4] and interpolated[-1] == 0


def test_branchgrpo_probability_weighted_node_rewards_by_hand():
    """A root over A = {0, 1} (step log-prob -1) and B = {2, 3} (-2); A's leaves have step log-probs 0.5, -0.5,
    B's 0, 0; leaf rewards [1, 0, 0.2, 0.6]. By hand: A = softmax(0.5, -0.5)·(1, 0) = sigmoid(1) = 0.7310586,
    B = 0.4, root = sigmoid(1)·0.7310586 + (1 - sigmoid(1))·0.4 = 0.6420232. A skipped leaf (NaN reward, left out
    of node_leaves) drops out of its parent's softmax: with leaf 0 skipped, A = 0."""
    from flowalign.algorithms.grpo.advantages import prob_weighted_node_rewards

    below = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                          [0, 0, 0, 1]], dtype=torch.bool)
    depth = torch.tensor([0, 1, 1, 2, 2, 2, 2])
    edge = torch.tensor([0.0, -1.0, -2.0, 0.5, -0.5, 0.0, 0.0])
    rewards = torch.tensor([1.0, 0.0, 0.2, 0.6])
    got = prob_weighted_node_rewards(rewards, below, depth, edge)
    assert torch.allclose(got, torch.tensor([0.6420232, 0.7310586, 0.4, 1.0, 0.0, 0.2, 0.6]), atol=1e-6)
    skipped = below.clone()
    skipped[:, 0] = False
    got = prob_weighted_node_rewards(rewards, skipped, depth, edge)
    assert torch.isnan(got[3]) and got[1] == 0.0


def test_tree_grpo_trains_with_probability_weighted_node_rewards(tmp_path):
    """Dynamic-TreeRPO with BranchGRPO's node rewards: the children's steps into them carry log-probs (SDE
    branches), the advantages differ from the mean-reward ones, and an iteration trains."""
    from flowalign.methods.tree_grpo import edge_log_probs

    overrides = ["train.prompts_per_iteration=2", "train.steps=6", "tree_grpo.tree_depth=2", "tree_grpo.window_size=2",
                 "train.eval_prompts=0", "train.checkpoint_every=0", "train.iterations=1"]
    trainers = [make_trainer(load_config("configs/toy/digits_tree_grpo.yaml", [*overrides, *extra,
                                                                              f"output_dir={tmp_path / str(i)}"]))
                for i, extra in enumerate([[], ["tree_grpo.node_reward=prob_weighted"]])]
    batches = []
    for tr in trainers:
        batch = tr.rollout(0)
        tr.score(batch)
        tr.advantages(batch)
        batches.append(batch)
    rollout = batches[1].rollout
    children = rollout.node_depth > 0
    assert bool((edge_log_probs(rollout)[children] != 0).all())
    assert torch.allclose(batches[0].rewards, batches[1].rewards)
    assert not torch.allclose(batches[0].advantages, batches[1].advantages)
    history = trainers[1].fit(progress=False)
    assert torch.isfinite(torch.tensor(history[0]["policy_loss"]))


def test_mix_grpo_balance_rerange_alternates_signs_and_drops_zeros():
    """MixGRPO's advantage_rerange_strategy=balance: advantages [0.5, -1, 0, 2, -0.3, 0.7] have 3 positive,
    2 negative and 1 zero transition: the order takes the smaller (negative) side first, in turns, then the rest:
    signs -, +, -, +, +; the zero one is dropped. `none` keeps the order as given."""
    from flowalign.methods.mix_grpo import MixGRPO, MixGRPOOptions

    adv = torch.tensor([0.5, -1.0, 0.0, 2.0, -0.3, 0.7])
    method = MixGRPO(MixGRPOOptions(rerange="balance"), load_config("configs/toy/digits_mix_grpo.yaml").train)
    order = method.update_order(torch.arange(6), adv, torch.Generator().manual_seed(0))
    assert torch.sign(adv[order]).tolist() == [-1, 1, -1, 1, 1] and sorted(order.tolist()) == [0, 1, 3, 4, 5]
    plain = MixGRPO(MixGRPOOptions(), load_config("configs/toy/digits_mix_grpo.yaml").train)
    assert torch.equal(plain.update_order(torch.arange(6), adv, torch.Generator()), torch.arange(6))
    assert method.reorders and not plain.reorders


def test_the_fast_window_can_start_above_step_zero():
    """Flow-Factory draws its one SDE step from {1, 2, 3}: window_low 1, size 1, high 4 gives exactly those."""
    from flowalign.modifiers.fast import Fast, FastOptions

    fast = Fast(FastOptions(window_size=1, window_high=4, window_low=1), method=None)
    assert {tuple(fast.window(10, seed=0).steps(i, 10)) for i in range(200)} == {(1,), (2,), (3,)}
    assert {fast.window(10, seed=0).steps(i, 10)[0] for i in range(200)} == {1, 2, 3}
    with pytest.raises(ConfigError, match=r"modifiers.fast: window_low 4 \+ window_size 2 does not fit below step 4"):
        load_config("configs/toy/digits_flow_grpo_fast.yaml", ["modifiers.fast.window_low=4",
                                                               "modifiers.fast.window_high=4"])
