"""BranchGRPO's choices for the tree: depth and width pruning, and its zero advantages when a depth's rewards are
all equal. Expected values are worked out by hand from BranchGRPO's training script (``train_branchgrpo_flux.py``):
a node's depth counts the steps from the root, training steps count from 1."""
import torch

from flowalign.algorithms.grpo.advantages import group_advantages
from flowalign.algorithms.grpo.pruning import depth_kept, sliding_depths, width_kept
from flowalign.config import load_config
from flowalign.training import make_trainer


def test_sliding_depth_window_by_hand():
    """The anchor's script: depths [15, 16, 17], interval 30, stop depth 9. Training step s = iteration + 1 shifts
    by s // 30, at most 15 - 9 = 6: iteration 28 (step 29) prunes [15, 16, 17], iteration 29 (step 30)
    [14, 15, 16], iteration 89 (step 90) [12, 13, 14], iteration 299 (step 300; 10 > 6) [9, 10, 11]."""
    assert sliding_depths([15, 16, 17], 28, 30, 9) == [15, 16, 17]
    assert sliding_depths([15, 16, 17], 29, 30, 9) == [14, 15, 16]
    assert sliding_depths([15, 16, 17], 89, 30, 9) == [12, 13, 14]
    assert sliding_depths([15, 16, 17], 299, 30, 9) == [9, 10, 11]
    assert sliding_depths([5, 6], 10, 1, 9) == [5, 6]  # already above the stop depth: never moves


def test_depth_pruning_by_hand():
    """The transition out of grid step s leads into depth s + 1: pruning depths {2, 4} leaves out steps 1 and 3."""
    step = torch.tensor([0, 1, 2, 3, 4, 5, 1, 3])
    assert depth_kept(step, [2, 4]).tolist() == [True, False, True, False, True, True, False, False]


def test_width_pruning_per_branch_by_hand():
    """Last split at step 1, so steps 2.. form the last layer. Branch 7 has steps 2, 3, 4 with advantages 0.1, 0.9,
    0.5: ratio 0.5 keeps max(1, int(1.5)) = 1, the best (step 3). Branch 8 has steps 2, 3 with equal advantages:
    it keeps 1, the earlier step (the anchor's stable sort over its depth-first list). Steps 0 and 1 stay."""
    step = torch.tensor([0, 1, 2, 3, 4, 2, 3])
    branch = torch.tensor([5, 7, 7, 7, 7, 8, 8])
    adv = torch.tensor([-3.0, -3.0, 0.1, 0.9, 0.5, 0.4, 0.4])
    kept = width_kept(step, branch, torch.zeros(7, dtype=torch.long), adv, 1, "per_branch", 0.5)
    assert kept.tolist() == [True, True, False, True, False, True, False]


def test_width_pruning_best_and_worst_by_hand():
    """Per prompt: prompt 0 has 5 last-layer transitions with advantages [2, -1, 0, 1, -2]; ratio 0.5 gives
    k = max(2, int(2.5)) = 2: the best one (2) and the worst one (-2). Prompt 1 has 2 transitions: k = 2 keeps
    both. The transition at the split step itself (step 3 = last split) is not in the last layer and stays."""
    step = torch.tensor([4, 4, 5, 5, 6, 4, 5, 3])
    branch = torch.tensor([1, 2, 1, 2, 1, 3, 3, 0])
    prompt = torch.tensor([0, 0, 0, 0, 0, 1, 1, 0])
    adv = torch.tensor([2.0, -1.0, 0.0, 1.0, -2.0, 5.0, 5.0, -9.0])
    kept = width_kept(step, branch, prompt, adv, 3, "best_worst", 0.5)
    assert kept.tolist() == [True, False, False, False, True, True, True, True]
    kept = width_kept(step, branch, prompt, adv, 3, "best_worst", 1.0)  # k = 5: all of prompt 0
    assert bool(kept.all())


def test_advantages_are_zero_where_a_groups_std_is_below_the_floor():
    """BranchGRPO: a depth whose node rewards have an (unbiased) std below 1e-6 gets advantage 0; otherwise
    (r - mean) / (std + 1e-8). Group 0: [0.5, 0.5 + 1e-7] (in float32 0.5 and 0.50000012, std 8.4e-8): 0 with
    the floor, about ±0.63 without it. Group 1: [1, 3]: std sqrt(2), advantages ∓1/sqrt(2)."""
    rewards = torch.tensor([0.5, 0.5 + 1e-7, 1.0, 3.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1])
    floored = group_advantages(rewards.float(), groups, "group", 1e-8, True, zero_below=1e-6)
    assert floored[:2].tolist() == [0.0, 0.0]
    assert torch.allclose(floored[2:], torch.tensor([-0.7071068, 0.7071068]), atol=1e-6)
    plain = group_advantages(rewards.float(), groups, "group", 1e-8, True)
    assert bool((plain[:2].abs() > 0.5).all())


def _trainer(tmp_path, *extra: str):
    overrides = ["train.prompts_per_iteration=2", "train.steps=8", "tree_grpo.tree_depth=2",
                 "tree_grpo.window_size=4", "tree_grpo.window_kind=fixed", "train.eval_prompts=0",
                 "train.checkpoint_every=0", "train.iterations=4", *extra, f"output_dir={tmp_path}"]
    return make_trainer(load_config("configs/toy/digits_tree_grpo.yaml", overrides))


def test_tree_grpo_prunes_what_branchgrpo_prunes(tmp_path):
    """A depth-2 tree on the window [0, 3] splits at steps 0 and 1: per prompt 2 transitions at step 0 and
    4 leaves x 3 SDE steps (1, 2, 3) = 14 stored. Depth pruning [3] leaves out step 2: 4 per prompt, 8 of 28.
    Width pruning per_branch at 0.5: the last layer is steps 2, 3 (after the last split at 1), two per leaf, one
    kept per leaf: 8 of 28. best_worst at 0.5: of a prompt's 8, 2 best and 2 worst kept: 8 of 28. The trainer
    logs the count and trains the rest; with pruning_until 0.25 of 4 iterations, only the first iteration prunes."""
    counts = {}
    for name, extra in {"depth": ["tree_grpo.depth_pruning=[3]"],
                        "per_branch": ["tree_grpo.width_pruning=per_branch"],
                        "best_worst": ["tree_grpo.width_pruning=best_worst"]}.items():
        tr = _trainer(tmp_path / name, *extra)
        batch = tr.rollout(0)
        tr.score(batch)
        tr.advantages(batch)
        kept = tr.method.trained(batch.rollout, batch.advantages, 0)
        assert batch.rollout.num_transitions == 28
        counts[name] = int((~kept).sum())
        if name == "depth":
            assert not bool(kept[batch.rollout.step == 2].any()) and bool(kept[batch.rollout.step != 2].all())
    assert counts == {"depth": 8, "per_branch": 8, "best_worst": 8}
    tr = _trainer(tmp_path / "until", "tree_grpo.depth_pruning=[3]", "tree_grpo.pruning_until=0.25")
    trained, accumulate = [], tr._accumulate
    tr._accumulate = lambda batch, chunk, *rest: (trained.append((batch.iteration, batch.rollout.step[chunk])),
                                                  accumulate(batch, chunk, *rest))
    history = tr.fit(progress=False)
    first = torch.cat([s for i, s in trained if i == 0])
    assert len(first) == 20 and not bool((first == 2).any())  # exactly the kept transitions were trained
    assert len(torch.cat([s for i, s in trained if i == 1])) == 28
    assert history[0]["pruned_transitions"] == 8.0 and "pruned_transitions" not in history[1]
    assert all(torch.isfinite(torch.tensor(h["policy_loss"])) for h in history)
