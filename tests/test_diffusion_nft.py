"""DiffusionNFT: the optimality map, the loss and its gradient against hand computations from the paper's code
(``scripts/train_nft_sd3.py``), zero gradient where it must be, the old policy's decay, and exact resumption."""
import torch
from forward_helpers import assert_resume_is_bitwise, largest_gradients_with_flat_rewards

from flowalign.config import load_config
from flowalign.methods.diffusion_nft import nft_loss, optimality
from flowalign.training import make_trainer
from flowalign.training.shadow import ShadowWeights, ramp_decay

CONFIG = "configs/toy/digits_diffusion_nft.yaml"


def small(tmp_path, *overrides: str):
    """2 prompts x 4 samples, 4 steps, 3 grid levels per sample."""
    return make_trainer(load_config(CONFIG, [
        "train.prompts_per_iteration=2", "diffusion_nft.group_size=4", "train.steps=4", "diffusion_nft.fm_draws=3",
        "train.eval_prompts=0", "train.checkpoint_every=0", f"output_dir={tmp_path}", *overrides]))


def test_optimality_by_hand():
    """r = clip(0.5 + clip(A, ±5)/10, 0, 1): A = [-7, -5, 0, 2.5, 10] -> [0, 0, 0.5, 0.75, 1]; positive_only
    keeps the positive half ([0.5, 0.5, 0.5, 0.75, 1]), binary uses the sign ([0.4, 0.4, 0.5, 0.6, 0.6])."""
    a = torch.tensor([-7.0, -5.0, 0.0, 2.5, 10.0])
    assert optimality(a).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0]
    assert optimality(a, mode="positive_only").tolist() == [0.5, 0.5, 0.5, 0.75, 1.0]
    assert torch.allclose(optimality(a, mode="binary"), torch.tensor([0.4, 0.4, 0.5, 0.6, 0.6]))
    assert torch.allclose(optimality(a, mode="one_only"), torch.tensor([0.5, 0.5, 0.5, 0.6, 0.6]))


def test_loss_and_gradient_by_hand():
    """One point, two dimensions: σ = 0.5, u = ε - x0 = [1, -1], v_old = [0, 0], v = [1, 1], β = 1, r = 0.75.
    v+ = v = [1, 1], v- = 2·v_old - v = [-1, -1]. σ(v+ - u) = [0, 1]: mean square 0.5, mean |.| 0.5, L+ = 1;
    σ(v- - u) = [-1, 0]: L- = 1. L = 5·(0.75·1 + 0.25·1)/1 = 5. With the weights fixed,
    dL+/dv = 2σ²β(v+ - u)/(D·w+) = [0, 1] and dL-/dv = -2σ²β(v- - u)/(D·w-) = [1, 0], so
    dL/dv = 5·(0.75·[0, 1] + 0.25·[1, 0]) = [1.25, 3.75]. Without adaptive weighting L± = 0.5: L = 2.5.
    With β = 0.5: v+ = [0.5, 0.5], v- = [-0.5, -0.5]; σ(v+ - u) = [-0.25, 0.75]: L+ = 0.3125/0.5 = 0.625;
    σ(v- - u) = [-0.75, 0.25]: L- = 0.625; L = 5·0.625/0.5 = 6.25."""
    v = torch.tensor([[1.0, 1.0]], requires_grad=True)
    args = dict(v_old=torch.zeros(1, 2), target=torch.tensor([[1.0, -1.0]]), sigma=torch.tensor([0.5]),
                r=torch.tensor([0.75]))
    loss = nft_loss(v, beta=1.0, **args)
    loss.sum().backward()
    assert torch.allclose(loss, torch.tensor([5.0])) and torch.allclose(v.grad, torch.tensor([[1.25, 3.75]]))
    assert torch.allclose(nft_loss(v, beta=1.0, adaptive=False, **args), torch.tensor([2.5]))
    assert torch.allclose(nft_loss(v, beta=0.5, **args), torch.tensor([6.25]))


def test_no_gradient_where_the_policy_is_the_old_one_and_r_is_one_half():
    """r = 0.5 on the old policy: the positive and negative pulls cancel exactly, for any data."""
    g = torch.Generator().manual_seed(0)
    v_old = torch.randn(3, 4, 2, 2, generator=g)
    v = v_old.clone().requires_grad_(True)
    loss = nft_loss(v, v_old, torch.randn(3, 4, 2, 2, generator=g), torch.tensor([0.2, 0.5, 0.9]),
                    torch.full((3,), 0.5), beta=1.0)
    loss.sum().backward()
    assert v.grad.abs().max() < 1e-7


def test_old_policy_decay_schedules_by_hand():
    """The code's three schedules after `step` optimizer steps: type 0 (0, 0, flat 0): always 0; type 1
    (0.001, 0.5): step 100 -> 0.1, step 800 -> 0.5; type 2 (0.0075, 0.999, flat 75): step 74 -> 0, step 75 -> 0,
    step 100 -> 0.1875, step 500 -> 0.999. Blending [1, 2] toward [3, 6] at d = 0.25 gives [2.5, 5]."""
    assert ramp_decay(5, 0.0, 0.0) == 0.0
    assert abs(ramp_decay(100, 0.001, 0.5) - 0.1) < 1e-12 and ramp_decay(800, 0.001, 0.5) == 0.5
    assert ramp_decay(74, 0.0075, 0.999, 75) == 0.0 and ramp_decay(75, 0.0075, 0.999, 75) == 0.0
    assert abs(ramp_decay(100, 0.0075, 0.999, 75) - 0.1875) < 1e-12 and ramp_decay(500, 0.0075, 0.999, 75) == 0.999
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    shadow = ShadowWeights([p])
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 6.0]))
    with shadow.swapped_in():
        assert p.tolist() == [1.0, 2.0]
    assert p.tolist() == [3.0, 6.0]
    shadow.blend(0.25)
    assert shadow.tensors[0].tolist() == [2.5, 5.0]


def test_flat_rewards_give_no_policy_gradient_and_the_old_policy_samples(tmp_path):
    """Equal rewards in every group: every r is 0.5 and, on the first iteration, the policy is the old policy,
    so with kl_weight 0 the gradient is exactly zero. On the next iteration the samples come from the old weights
    (d = min(0.001·1, 0.5) of the old copy, 1 - d of the policy), not from the policy."""
    grads, metrics = largest_gradients_with_flat_rewards(small(tmp_path, "diffusion_nft.kl_weight=0"))
    assert grads == [0.0] and metrics["optimality/mean"] == 0.5 and metrics["old_decay"] == 0.001
    real = small(tmp_path / "real")
    initial = [p.detach().clone() for p in real.params]
    real.run_iteration(0)  # one real update: the policy moves, the old policy follows by 1 - d
    policy = [p.detach().clone() for p in real.params]
    old = [t.clone() for t in real.method.old.tensors]
    assert any(not torch.equal(a, b) for a, b in zip(policy, old))
    expected = [0.001 * i + 0.999 * p for i, p in zip(initial, policy)]
    assert all(torch.allclose(o, e) for o, e in zip(old, expected))
    seen = []
    velocity = real.gen.velocity

    def spy(x, sigma, cond, guidance=1.0):
        seen.append([p.detach().clone() for p in real.params])
        return velocity(x, sigma, cond, guidance)
    real.gen.velocity = spy
    real.sample(1)
    assert all(torch.equal(a, b) for a, b in zip(seen[0], old))
    assert all(torch.equal(a, b) for a, b in zip(real.params, policy))  # restored after sampling


def test_resume_is_bitwise_with_the_old_policy(tmp_path):
    assert_resume_is_bitwise(lambda folder, *o: small(folder, *o), tmp_path, "old")
