"""DGPO: the group weights against the paper's objective, the DSM clip, the group-shared points, zero gradient
where it must be, the CFG rule and exact resumption (the code: ``scripts/train_sd3_dgpo.py``)."""
import math

import pytest
import torch
from forward_helpers import assert_resume_is_bitwise, largest_gradients_with_flat_rewards

from flowalign.config import ConfigError, load_config
from flowalign.methods.dgpo import dsm_clipped, group_weights
from flowalign.training import make_trainer

CONFIG = "configs/toy/digits_dgpo.yaml"


def small(tmp_path, *overrides: str):
    """2 prompts x 4 samples, 6 steps, 2 levels from the first 4 of the grid."""
    return make_trainer(load_config(CONFIG, [
        "train.prompts_per_iteration=2", "dgpo.group_size=4", "train.steps=6", "dgpo.fm_draws=2",
        "dgpo.trunc_steps=3", "train.eval_prompts=0", "train.checkpoint_every=0", f"output_dir={tmp_path}",
        *overrides]))


def test_group_weights_by_hand_and_against_the_group_dpo_objective():
    """One group of G = 4, A = [1.5, 0.5, -0.5, -1.5], ℓ - ℓ_ref = [-0.04, 0, 0, 0], β = 100:
    s = 1.5·100·(-0.04)/4 = -1.5, every member's weight σ(-1.5) = 0.18242552. A second group (key 1), A = [1, -1]
    with ℓ - ℓ_ref = 0.3 for both, has s = 0, weight 0.5. The gradient of Σ w·A·ℓ in ℓ equals G/β times that of
    the paper's -log σ(M/G), M = R(G⁺) - R(G⁻) with R(G) = Σ |A|·β·(-(ℓ - ℓ_ref)), i.e. M = -Σ A·β·(ℓ - ℓ_ref)."""
    adv = torch.tensor([1.5, 0.5, -0.5, -1.5, 1.0, -1.0])
    loss_ref = torch.zeros(6)
    loss = torch.tensor([-0.04, 0.0, 0.0, 0.0, 0.3, 0.3], requires_grad=True)
    key = torch.tensor([0, 0, 0, 0, 1, 1])
    w = group_weights(adv, loss, loss_ref, key, 100.0, 4)
    assert torch.allclose(w, torch.tensor([0.18242552] * 4 + [0.5] * 2))
    first = slice(0, 4)
    margin = -(adv[first] * 100.0 * (loss[first] - loss_ref[first])).sum()
    dpo_grad = torch.autograd.grad(-torch.nn.functional.logsigmoid(margin / 4), loss)[0]
    ours = torch.autograd.grad((w[first] * adv[first] * loss[first]).sum(), loss)[0]
    assert torch.allclose(ours[first], dpo_grad[first] * 4 / 100.0, atol=1e-6)


def test_dsm_clip_by_hand():
    """ρ = exp(ℓ_old - ℓ): 1.02 with A > 0 is past 1 + 0.01 (clipped); 1.02 with A < 0 is not; 0.98 with A < 0
    is below 1 - 0.01 (clipped); 1.005 with A > 0 is inside."""
    loss = torch.zeros(4)
    old = torch.tensor([math.log(1.02), math.log(1.02), math.log(0.98), math.log(1.005)])
    clipped = dsm_clipped(loss, old, torch.tensor([1.0, -1.0, -1.0, 1.0]), 0.01)
    assert clipped.tolist() == [True, False, True, False]


def test_a_group_shares_its_points(tmp_path):
    """Draw m of every sample sits at one grid level among the first trunc_steps + 1; the members of a group share
    the noise of each draw, different groups do not."""
    tr = small(tmp_path)
    batch = tr.sample(0)
    points = tr.method.group_points(tr, batch)
    n = batch.leaves.shape[0]
    grid = tr.gen.sigmas(6)[:4]
    eps = points["target"] + batch.leaves[points["owner"]]
    for m in range(2):
        draw = slice(m * n, (m + 1) * n)
        assert len(set(points["sigma"][draw].tolist())) == 1 and bool(torch.isin(points["sigma"][draw], grid).all())
        groups = batch.leaf_ids // 4
        for g in groups.unique():
            members = eps[draw][groups == g]
            assert torch.allclose(members, members[:1].expand_as(members), atol=1e-6)
    assert not torch.allclose(eps[:n][batch.leaf_ids // 4 == 0][0], eps[:n][batch.leaf_ids // 4 == 1][0])
    assert points["sigma"][0] != points["sigma"][n]


def test_flat_rewards_at_the_start_give_no_gradient(tmp_path):
    grads, _ = largest_gradients_with_flat_rewards(small(tmp_path))
    assert grads == [0.0]


def test_guided_rollouts_with_an_unguided_loss_are_allowed_for_dgpo_only(tmp_path):
    load_config(CONFIG, [f"output_dir={tmp_path}"])  # train.guidance 3 with train.cfg false
    with pytest.raises(ConfigError, match="train.cfg=false trains the conditional velocity"):
        load_config("configs/toy/digits_awm.yaml", ["train.guidance=3.0", f"output_dir={tmp_path}"])


def test_resume_is_bitwise_with_the_ema(tmp_path):
    assert_resume_is_bitwise(lambda folder, *o: small(folder, *o, "dgpo.switch_ema_ref=1"), tmp_path, "ema")


def test_kl_cfg_makes_the_reference_the_base_with_cfg(tmp_path):
    """Mode 2a: unguided rollouts, the LoRA-off base with CFG 4.5 as the reference. The prompts then carry a negative
    branch, and v_ref equals v_u + 4.5·(v_c - v_u) of the base computed here directly; kl_cfg 1 leaves it unguided."""
    from flowalign.training.lora import adapters_disabled

    tr = small(tmp_path, "train.guidance=1.0", "dgpo.kl_cfg=4.5")
    batch = tr.sample(0)
    assert batch.cond.negative is not None
    points = tr.method.group_points(tr, batch)
    v_ref = tr.point_velocities(batch, points, reference=True, guidance=4.5)
    cond = batch.cond.select(batch.leaf_row[points["owner"]])
    with torch.no_grad(), adapters_disabled(tr.gen.trainable_module, True):
        v_c = tr.gen.predict(points["x"], points["sigma"], cond.positive)
        v_u = tr.gen.predict(points["x"], points["sigma"], cond.negative)
    torch.testing.assert_close(v_ref, v_u + 4.5 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(v_ref, v_c, atol=1e-3)
    seen, point_velocities = [], tr.point_velocities
    tr.point_velocities = lambda *a, **k: (seen.append((k.get("reference"), k.get("guidance"))),
                                           point_velocities(*a, **k))[1]
    tr.score(batch)
    batch.all_rewards, _ = tr.gathered(batch.rewards, batch)
    tr.method.update(tr, batch)
    assert (True, 4.5) in seen  # the update's reference is the guided base
    assert small(tmp_path / "plain", "train.guidance=1.0").sample(0).cond.negative is None
