"""AWM: the strata, lp forms, the clipped ratio and the distances against hand computations from the paper's code
(``advantage_weighted_matching/scripts/train_sd3_awm.py``), zero gradient where it must be, exact resumption."""
import math

import torch
from forward_helpers import assert_resume_is_bitwise, largest_gradients_with_flat_rewards

from flowalign.config import load_config
from flowalign.methods.awm import AWMOptions, clipped_policy, log_likelihood, stratified_indices, velocity_distance
from flowalign.training import make_trainer

CONFIG = "configs/toy/digits_awm.yaml"


def small(tmp_path, *overrides: str):
    """2 prompts x 4 samples, 6 steps, 2 strata per sample."""
    return make_trainer(load_config(CONFIG, [
        "train.prompts_per_iteration=2", "awm.group_size=4", "train.steps=6", "awm.fm_draws=2",
        "train.eval_prompts=0", "train.checkpoint_every=0", f"output_dir={tmp_path}", *overrides]))


def test_strata_by_hand():
    """14 steps at fraction 0.9: indices [1, 12] cut by linspace(1, 12, 7) = [1, 2.83, 4.67, 6.5, 8.33, 10.17, 12],
    as integers [1, 2, 4, 6, 8, 10, 12]: strata [1,2) [2,4) [4,6) [6,8) [8,10) [10,12), one index in each."""
    low, high = torch.tensor([1, 2, 4, 6, 8, 10]), torch.tensor([2, 4, 6, 8, 10, 12])
    seen = torch.stack([stratified_indices(14, 6, 0.9, torch.Generator().manual_seed(s)) for s in range(200)])
    assert bool(((seen >= low) & (seen < high)).all())
    assert seen.min(0).values.tolist() == low.tolist() and seen.max(0).values.tolist() == (high - 1).tolist()


def test_lp_forms_and_policy_gradient_by_hand():
    """v - u = [1, 1], σ = 0.5: ℓ = 1. ghuber (p 0.25): lp = -((1 + 1e-10)^0.25 - 1e-10^0.25)·0.5/0.25
    = -(1 - 0.00316228)·2 = -1.99367544; uniform -1; t -0.5; t2 -0.25; huber -(1 - 1e-5)·0.5 = -0.499995.
    dlp/dv = -σ·(ℓ + 1e-10)^(p-1)·2(v - u)/D = [-0.5, -0.5], so on-policy (ρ = 1) with A = 0.6 the loss is -0.6
    and its gradient -A·dlp/dv = [0.3, 0.3]."""
    points = {"target": torch.tensor([[0.0, 0.0]]), "sigma": torch.tensor([0.5])}
    v = torch.tensor([[1.0, 1.0]], requires_grad=True)
    expected = {"ghuber": -1.99367544, "uniform": -1.0, "t": -0.5, "t2": -0.25, "huber": -0.499995}
    for kind, value in expected.items():
        lp = log_likelihood(v, points, AWMOptions(weighting=kind))
        assert abs(lp.item() - value) < 1e-7, kind
    lp = log_likelihood(v, points, AWMOptions())
    loss = clipped_policy(lp, lp.detach(), torch.tensor([0.6]), 1.0)
    loss.sum().backward()
    assert abs(loss.item() + 0.6) < 1e-7 and torch.allclose(v.grad, torch.tensor([[0.3, 0.3]]))


def test_clipped_ratio_and_distances_by_hand():
    """Off-policy, ρ = 1.5, clip 0.2: A = 1 gives max(-1.5, -1.2) = -1.2, A = -1 gives max(1.5, 1.2) = 1.5;
    A = 0 has no gradient. mean (v - v_ref)² = 1 at σ = 0.5; elbo divides by 2g² = 2·0.49·0.5/0.5 = 0.98."""
    lp = torch.tensor([math.log(1.5), math.log(1.5), 0.0], dtype=torch.float64, requires_grad=True)
    loss = clipped_policy(lp, torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, -1.0, 0.0]), 0.2)
    assert torch.allclose(loss, torch.tensor([-1.2, 1.5, 0.0]))
    loss[2].backward()
    assert lp.grad[2] == 0
    v, ref, sigma = torch.ones(1, 2), torch.zeros(1, 2), torch.tensor([0.5])
    assert velocity_distance(v, ref, sigma, "uniform").item() == 1.0
    assert abs(velocity_distance(v, ref, sigma, "elbo").item() - 1 / 0.98) < 1e-6


def test_flat_rewards_at_the_start_give_no_gradient(tmp_path):
    """Equal rewards: every advantage is 0; on the first iteration the policy is the base and its EMA (the LoRA's
    B is 0), so the two distances have no gradient either: the update's gradient is exactly zero."""
    grads, metrics = largest_gradients_with_flat_rewards(small(tmp_path))
    assert grads == [0.0] and metrics["advantage/abs_mean"] == 0.0 and metrics["ema_decay"] == 0.001


def test_two_updates_use_the_pre_update_likelihoods(tmp_path):
    """With two updates per iteration the second one is off-policy: its ratios are measured against the
    likelihoods before the first update, so they move away from 1 and the clip can act."""
    on_policy = small(tmp_path / "one").run_iteration(0)[0]
    assert on_policy["ratio_deviation"] == 0.0  # ρ = exp(lp - sg(lp)) is exactly 1
    tr = small(tmp_path / "two", "train.updates_per_iteration=2", "awm.clip_range=0.2")
    metrics, _ = tr.run_iteration(0)
    assert metrics["ratio_deviation"] > 1e-6 and metrics["ema_decay"] == 0.002


def test_resume_is_bitwise_with_the_ema(tmp_path):
    assert_resume_is_bitwise(lambda folder, *o: small(folder, *o), tmp_path, "ema")
