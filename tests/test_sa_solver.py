"""SA-Solver (AWM's rollout sampler): second-order convergence at τ 0 on a Gaussian flow with an exact solution,
its first steps against the paper's update written out by hand (τ 0 and τ 0.4), per-sample noise independent of
the batch, and an AWM iteration on the toy with ``awm.solver: sa_solver``."""
import math

import torch

from flowalign.config import load_config
from flowalign.samplers import awm_grid, euler_ode, sa_solver
from flowalign.training import make_trainer
from flowalign.training.lora import trainable_state

MU, S = 0.7, 0.5  # data N(MU, S²)


def gaussian_std(sigma: torch.Tensor) -> torch.Tensor:
    """The marginal std of ``x_σ = (1-σ)x0 + σε``: ``sqrt((1-σ)²S² + σ²)``."""
    return torch.sqrt(((1 - sigma) * S) ** 2 + sigma ** 2)


def gaussian_velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``E[ε - x0 | x_σ]``, linear in x; its flow keeps the standard score ``z = (x - (1-σ)μ)/std(σ)`` fixed."""
    return -MU + (sigma - (1 - sigma) * S * S) / gaussian_std(sigma) ** 2 * (x - (1 - sigma) * MU)


def test_without_noise_it_converges_at_second_order():
    """The exact flow from σ 0.9 is ``x_σ = (1-σ)μ + std(σ)·z``. Doubling the steps (16, 32, 64) divides the error
    by about 4 ending at σ 0.1 and at σ 0 (where the solver returns the last data prediction), Euler's by 2."""
    z = torch.linspace(-2, 2, 5, dtype=torch.float64)
    start = torch.tensor(0.9, dtype=torch.float64)
    for end in (0.1, 0.0):
        x = (1 - start) * MU + gaussian_std(start) * z
        exact = (1 - end) * MU + gaussian_std(torch.tensor(end, dtype=torch.float64)) * z
        errors, euler = [], []
        for steps in (16, 32, 64):
            grid = torch.linspace(0.9, end, steps + 1, dtype=torch.float64)
            errors.append((sa_solver(gaussian_velocity, x, grid) - exact).abs().max().item())
            euler.append((euler_ode(gaussian_velocity, x, grid) - exact).abs().max().item())
        ratios = [a / b for a, b in zip(errors, errors[1:])]
        assert all(3.5 < r < 4.8 for r in ratios), (end, ratios)
        assert all(1.7 < a / b < 2.3 for a, b in zip(euler, euler[1:])) and errors[-1] < euler[-1] / 10


def recorded(velocity):
    """``velocity`` that also records the states it is called at."""
    calls = []

    def wrapped(x, sigma):
        calls.append((x.clone(), float(sigma)))
        return velocity(x, sigma)
    return wrapped, calls


def test_the_first_ode_step_by_hand():
    """v = 0.5x + 1, x = [1, -2], σ 0.8 → 0.5: D = x - 0.8v = 0.6x - 0.8 = [-0.2, -2]; λ 0.8 = log(0.25), λ 0.5 = 0,
    h = log 4; the first step (order 1, no corrector) x' = (0.5/0.8)x + 0.5·(1 - e^{-h})·D = 0.625x + 0.375D
    = [0.55, -2.0]: the state the second evaluation sees."""
    velocity, calls = recorded(lambda x, sigma: 0.5 * x + 1)
    sa_solver(velocity, torch.tensor([[1.0, -2.0]], dtype=torch.float64), torch.tensor([0.8, 0.5, 0.0]))
    assert len(calls) == 2 and calls[1][1] == 0.5
    assert torch.allclose(calls[1][0], torch.tensor([[0.55, -2.0]], dtype=torch.float64), atol=1e-12)


def test_stochastic_steps_by_hand():
    """τ 0.4 (ρ = 1 + τ² = 1.16) on σ 0.8 → 0.5 → 0.35, all inside [0.3, 0.9]; v = 0.5x + 1, D(x, σ) = x - σv.
    The paper's data-prediction step from s to t (h = λ_t - λ_s, α = 1-σ) is
    ``x_t = (σ_t/σ_s)e^{-τ²h}x_s + α_t(1 - e^{-ρh})·D_0 + α_t·ρ·(h²/2)·slope + σ_t·sqrt(1 - e^{-2τ²h})·ξ``
    (the slope's weight h²/2 is Appendix D's rescaling). Step 1: predictor order 1, no corrector, ξ₁.
    Step 2 (the last, so predictor order 1): x_p from D₁ with ξ₂, D₂ = D(x_p, 0.35), then the order-2 corrector
    with slope (D₂ - D₁)/h and the same ξ₂. ξ: the sample's generator's first and second draws."""
    tau, rho = 0.4, 1.16
    lam = lambda s: math.log((1 - s) / s)  # noqa: E731
    data = lambda x, s: x - s * (0.5 * x + 1)  # noqa: E731
    seed, x = 123, torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    draws = torch.Generator().manual_seed(seed)
    xi1, xi2 = (torch.randn(2, generator=draws, dtype=torch.float64) for _ in range(2))

    def step(x_s, s, t, d0, slope, xi):
        h = lam(t) - lam(s)
        out = (t / s) * math.exp(-tau ** 2 * h) * x_s + (1 - t) * (1 - math.exp(-rho * h)) * d0
        out = out + t * math.sqrt(1 - math.exp(-2 * tau ** 2 * h)) * xi
        return out if slope is None else out + (1 - t) * rho * h * h / 2 * slope

    x1 = step(x, 0.8, 0.5, data(x, 0.8), None, xi1)
    d1 = data(x1, 0.5)
    d2 = data(step(x1, 0.5, 0.35, d1, None, xi2), 0.35)
    x2 = step(x1, 0.5, 0.35, d1, (d2 - d1) / (lam(0.35) - lam(0.5)), xi2)
    velocity, calls = recorded(lambda x, sigma: 0.5 * x + 1)
    out = sa_solver(velocity, x, torch.tensor([0.8, 0.5, 0.35], dtype=torch.float64),
                    [torch.Generator().manual_seed(seed)], tau=tau)
    assert torch.allclose(calls[1][0], x1, atol=1e-12) and torch.allclose(out, x2, atol=1e-12)
    assert not torch.allclose(out, sa_solver(velocity, x, torch.tensor([0.8, 0.5, 0.35], dtype=torch.float64)))


def test_noise_is_per_sample_and_outside_the_interval_none():
    """A sample's trajectory depends on its own generator only, not on the samples batched with it; with every
    target σ outside [0.3, 0.9] (here 0.25 → 0.1) no noise is drawn, whatever the generators."""
    x = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0))
    grid = awm_grid(torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0]))
    assert torch.allclose(grid, torch.tensor([0.999, 0.8, 0.6, 0.4, 0.2, 0.0]))  # t[-2] = t[-3]/2, t[0] = 1-1e-3
    velocity = lambda x, sigma: torch.tanh(x) + sigma  # noqa: E731
    seeded = lambda keys: [torch.Generator().manual_seed(100 + k) for k in keys]  # noqa: E731
    batch = sa_solver(velocity, x, grid, seeded(range(4)), tau=0.4)
    alone = torch.cat([sa_solver(velocity, x[k:k + 1], grid, seeded([k]), tau=0.4) for k in (2, 0, 3, 1)])
    assert torch.allclose(batch[[2, 0, 3, 1]], alone, atol=1e-6)
    assert not torch.allclose(batch, sa_solver(velocity, x, grid, seeded(range(10, 14)), tau=0.4))
    late = torch.tensor([0.25, 0.18, 0.1])
    assert torch.equal(sa_solver(velocity, x, late, seeded(range(4)), tau=0.4), sa_solver(velocity, x, late))


def test_an_awm_iteration_with_sa_solver_moves_the_lora(tmp_path):
    """2 prompts x 4 samples, 4 steps with ``awm.solver: sa_solver``: the LoRA's B leaves 0 after one iteration;
    the samples do not depend on ``train.rollout_batch``."""
    def trainer(name, *overrides):
        return make_trainer(load_config("configs/toy/digits_awm.yaml", [
            "train.prompts_per_iteration=2", "awm.group_size=4", "train.steps=4", "awm.fm_draws=2",
            "awm.solver=sa_solver", "train.eval_prompts=0", "train.checkpoint_every=0", f"output_dir={tmp_path / name}",
            *overrides]))
    tr = trainer("a", "train.rollout_batch=8")
    batch = tr.sample(0)
    assert torch.allclose(batch.leaves, trainer("b", "train.rollout_batch=3").sample(0).leaves, atol=1e-5)
    before = {k: v.clone() for k, v in trainable_state(tr.gen.trainable_module, True).items()}
    metrics, _ = tr.run_iteration(0)
    after = trainable_state(tr.gen.trainable_module, True)
    moved = [k for k in before if "lora_B" in k and not torch.equal(before[k], after[k])]
    assert math.isfinite(metrics["policy_loss"]) and moved and all(before[k].abs().max() == 0 for k in moved)
