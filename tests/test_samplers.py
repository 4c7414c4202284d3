"""samplers/: the step kernel, time grids, windows and rollout structures, checked against exact answers."""
import math

import pytest
import torch

from flowalign.samplers.kernels import cps, dance, ddim, flow_grpo, kl_to_reference, step, zero
from flowalign.samplers.ode import euler_ode
from flowalign.samplers.rollout import run_plan
from flowalign.samplers.structures import branches, independent, linear_depth_noise, singular, tree
from flowalign.samplers.timegrid import from_scheduler_config, shifted_linspace
from flowalign.samplers.windows import WindowSchedule

SCHEDULES = [flow_grpo(0.7), dance(0.3), cps(0.8), ddim(1.0)]


def toy_velocity(dim: int = 6, rows: int = 4, seed: int = 0):
    """A smooth, row-conditioned velocity field (stands in for a model in structure tests)."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(dim, dim, generator=g) / dim, torch.randn(rows, dim, generator=g)
    return lambda x, s, r: torch.tanh(x @ w) + s.view(-1, 1) * b[r]


# ---------------------------------------------------------------- kernel

@pytest.mark.parametrize("schedule", SCHEDULES + [zero()], ids=lambda s: s.kind)
def test_no_noise_is_the_euler_step(schedule):
    x, v = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    out = step(v, x, 0.6, 0.45, noise=torch.zeros_like(x), schedule=schedule, noise_scale=0.0)
    assert torch.allclose(out.x_next, x - 0.15 * v, atol=1e-6)
    assert (out.logp == 0).all() and (out.std == 0).all()


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.kind)
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_logp_is_the_normal_log_density(schedule, reduce):
    x, v = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    sigma, sigma_next = torch.tensor([1.0, 0.8, 0.5, 0.2]), torch.tensor([0.9, 0.7, 0.4, 0.05])
    out = step(v, x, sigma, sigma_next, schedule=schedule, reduce=reduce)
    ref = torch.distributions.Normal(out.mean, out.std.view(-1, 1, 1, 1)).log_prob(out.x_next)
    ref = ref.mean(dim=(1, 2, 3)) if reduce == "mean" else ref.sum(dim=(1, 2, 3))
    assert torch.allclose(out.logp, ref, atol=1e-4)


def test_flow_grpo_matches_the_anchor_formulas():
    """Flow-GRPO's expanded mean, std a·sqrt(σ/(1-σ))·sqrt(|Δσ|), σ = 1 handled with σ_next in the denominator."""
    a, x, v = 0.7, torch.randn(2, 8), torch.randn(2, 8)
    for s, s_next in [(0.8, 0.6), (1.0, 0.9)]:
        g = a * math.sqrt(s / (1 - (s_next if s == 1.0 else s)))
        dt = s_next - s
        mean = x * (1 + g ** 2 / (2 * s) * dt) + v * (1 + g ** 2 * (1 - s) / (2 * s)) * dt
        out = step(v, x, s, s_next, schedule=flow_grpo(a))
        assert torch.allclose(out.mean, mean, atol=1e-6)
        assert torch.allclose(out.std, torch.full((2,), g * math.sqrt(-dt)))


def test_dance_and_cps_match_the_anchor_formulas():
    x, v, s, s_next, eta = torch.randn(2, 8), torch.randn(2, 8), 0.7, 0.55, 0.3
    x0 = x - s * v
    score = -(x - (1 - s) * x0) / s ** 2
    dance_mean = x + (s_next - s) * v - 0.5 * eta ** 2 * score * (s_next - s)
    assert torch.allclose(step(v, x, s, s_next, schedule=dance(eta)).mean, dance_mean, atol=1e-6)
    a = 0.8
    std = s_next * math.sin(a * math.pi / 2)
    cps_mean = x0 * (1 - s_next) + (x + (1 - s) * v) * math.sqrt(s_next ** 2 - std ** 2)
    out = step(v, x, s, s_next, schedule=cps(a, logp="flow_grpo"))
    assert torch.allclose(out.mean, cps_mean, atol=1e-6)
    assert torch.allclose(out.logp, -((out.x_next - cps_mean) ** 2).mean(-1), atol=1e-6)


def test_ddim_in_flow_coordinates_is_ddim():
    """DDIM-η on the DDPM latent, mapped to flow coordinates, equals the kernel's ddim(η) step."""
    eta, s, s_next = 0.7, 0.6, 0.4
    x0, eps = torch.randn(3, 5), torch.randn(3, 5)
    ab = lambda t: (1 - t) ** 2 / ((1 - t) ** 2 + t ** 2)  # noqa: E731
    a, a_next = ab(s), ab(s_next)
    x_ddpm = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    sig = eta * math.sqrt((1 - a_next) / (1 - a)) * math.sqrt(1 - a / a_next)
    z = torch.randn(3, 5)
    x_next_ddpm = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next - sig ** 2) * eps + sig * z
    to_flow = lambda x, t: x / (math.sqrt(ab(t)) + math.sqrt(1 - ab(t)))  # noqa: E731
    x = to_flow(x_ddpm, s)
    v = eps - x0  # the flow velocity of a perfect model
    out = step(v, x, s, s_next, noise=z, schedule=ddim(eta))
    assert torch.allclose(out.x_next, to_flow(x_next_ddpm, s_next), atol=1e-5)


def test_logp_is_fp32_under_bf16():
    x, v = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16), torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = step(v, x, 0.5, 0.4, schedule=flow_grpo())
    assert out.logp.dtype == out.mean.dtype == out.x_next.dtype == torch.float32
    again = step(v, x, 0.5, 0.4, schedule=flow_grpo(), prev_sample=out.x_next)
    assert torch.equal(again.logp, out.logp)


def test_kl_denominators():
    mean, ref, s, s_next = torch.randn(3, 6), torch.randn(3, 6), 0.5, 0.4
    std = step(torch.zeros(3, 6), torch.zeros(3, 6), s, s_next, schedule=flow_grpo()).std
    sq = ((mean - ref) ** 2).mean(-1)
    g = 0.7 * math.sqrt(s / (1 - s))
    assert torch.allclose(kl_to_reference(mean, ref, std, s, s_next, "flow_grpo"), sq / (2 * g ** 2))
    assert torch.allclose(kl_to_reference(mean, ref, std, s, s_next, "gaussian"), sq / (2 * std ** 2))


def test_kl_under_cps_divides_by_the_actual_step_variance():
    """Flow-GRPO's CPS step returns std = sigma_next * sin(a*pi/2) and its KL divides by twice its square:
    sigma 0.6 -> 0.5, a = 0.8: std = 0.5 * sin(0.4 pi) = 0.4755283, a mean difference of 0.1 everywhere gives
    0.01 / (2 * 0.2261271) = 0.0221115 (the sigma-free SDE denominator would be 10x smaller here)."""
    mean, ref = torch.full((2, 8), 0.3), torch.full((2, 8), 0.2)
    std = step(torch.zeros(2, 8), torch.zeros(2, 8), 0.6, 0.5, schedule=cps(0.8)).std
    assert torch.allclose(std, torch.tensor([0.4755283] * 2))
    kl = kl_to_reference(mean, ref, std, 0.6, 0.5, "flow_grpo", coefficient_preserving=True)
    assert torch.allclose(kl, torch.tensor([0.0221115] * 2), rtol=1e-5)
    assert torch.allclose(kl_to_reference(mean, ref, std, 0.6, 0.5, "flow_grpo"), kl * 0.1, rtol=1e-5)


# ---------------------------------------------------------------- time grids and windows

def test_time_grids_match_diffusers_pipelines():
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    grid = from_scheduler_config(sd3.config, 10)
    retrieve_timesteps(sd3, 10)
    assert torch.allclose(grid, sd3.sigmas.float()) and grid[-1] == 0 and len(grid) == 11
    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256,
                                           max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    mu = calculate_shift(4096, 256, 4096, 0.5, 1.15)
    retrieve_timesteps(flux, 28, sigmas=np.linspace(1.0, 1 / 28, 28), mu=mu)  # as FluxPipeline does
    assert torch.allclose(from_scheduler_config(flux.config, 28, 4096, base="flux"), flux.sigmas.float())
    with pytest.raises(ValueError, match="image_seq_len"):
        from_scheduler_config(flux.config, 28)
    lin = shifted_linspace(4, 3.0)
    assert torch.allclose(lin, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))


def test_window_schedules():
    prog = WindowSchedule("progressive", size=4, dwell=3, stride=1, max_steps=8)
    starts = [prog.steps(i, 10)[0] for i in range(27)]
    assert starts[:9] == [0, 0, 0, 1, 1, 1, 2, 2, 2] and starts[24] == 0  # rolls back after start 7
    assert prog.steps(21, 10) == [7]  # clipped at max_steps
    jump = WindowSchedule("progressive", size=2, dwell=1, stride=2, roll_back=False, max_steps=6)
    assert [jump.steps(i, 10)[0] for i in range(5)] == [0, 2, 4, 5, 5]
    decay = WindowSchedule("decay", size=2, dwell=8, stride=1, max_steps=8)
    starts = [decay.steps(i, 10)[0] for i in range(20)]
    dwells = [starts.count(p) for p in range(2)]
    assert dwells == [8, 7] and starts[15] == 2  # dwell int(8·(1-p/8) + 2·p/8) shrinks as the window moves
    rand = WindowSchedule("random", size=2, high=5, seed=3)
    picks = [rand.steps(i, 10) for i in range(200)]
    assert picks == [rand.steps(i, 10) for i in range(200)]  # a pure function of the iteration
    assert {p[0] for p in picks} == {0, 1, 2, 3} and all(len(p) == 2 for p in picks)
    with pytest.raises(ValueError, match="window kind"):
        WindowSchedule("sideways").steps(0, 10)


# ---------------------------------------------------------------- rollouts

T = 8
SIGMAS = shifted_linspace(T, 3.0)
P = 3


def plans():
    return {
        "independent": independent(SIGMAS, P, 4),
        "dance_subset": independent(SIGMAS, P, 4, train_steps=list(range(T - 1)), train_fraction=0.6),
        "window_shared": independent(SIGMAS, P, 4, sde_steps=[2, 3], share_prefix=True),
        "branches": branches(SIGMAS, P, [0, 2, 4], num_branches=3),
        "singular": singular(SIGMAS, P, [0, 1, 7], group_size=4, strides=(1, 2, 3)),
        "tree": tree(SIGMAS, P, [0, 2, 4], branching=2, depth_noise=linear_depth_noise(0.5)),
    }


def run(name, schedule=flow_grpo(0.7), seed=0, max_batch=None, velocity=None):
    roots, rows = plans()[name]
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(len(roots), 6, generator=g)
    return run_plan(velocity or toy_velocity(), roots, rows, x0, schedule, g, max_batch), x0, rows


def strided_nfe(k: int, strides) -> int:
    """NFEs of one G²RPO branch after its SDE step at k: one shared evaluation, then each stride's rest."""
    remaining = T - (k + 1)
    if remaining == 0:
        return 0
    return 1 + sum(math.ceil(remaining / lam) - 1 for lam in strides)


@pytest.mark.parametrize("name, nfe, leaves", [
    ("independent", P * 4 * T, P * 4),
    ("dance_subset", P * 4 * T, P * 4),
    ("window_shared", P * (2 + 1 + 4 * (T - 3)), P * 4),
    ("branches", P * (5 + 3 * sum(T - i - 1 for i in [0, 2, 4])), P * 9),
    ("singular", P * (8 + 4 * sum(strided_nfe(k, (1, 2, 3)) for k in [0, 1, 7])), P * 3 * 4 * 3),
    ("tree", P * (sum(2 ** j * n for j, n in enumerate([0, 2, 2, 4])) - (1 + 2 + 4)), P * 8),
])
def test_nfe_matches_the_formula(name, nfe, leaves):
    rollout, _, _ = run(name)
    assert rollout.nfe == nfe and rollout.leaves.shape[0] == leaves


def test_tree_costs_fewer_nfe_per_leaf_than_independent():
    indep, _, _ = run("independent")
    tr, _, _ = run("tree")
    assert tr.nfe / tr.leaves.shape[0] < indep.nfe / indep.leaves.shape[0]


def test_credit_and_groups():
    ind, _, _ = run("independent")
    assert (ind.transition_leaves.sum(1) == 1).all() and ind.leaf_group.unique().numel() == P
    dance_run, _, _ = run("dance_subset")
    assert dance_run.num_transitions == P * 4 * int((T - 1) * 0.6)
    br, _, _ = run("branches")
    assert br.leaf_group.unique().numel() == P * 3 and br.num_transitions == P * 9
    sg, _, _ = run("singular")
    assert (sg.transition_leaves.sum(1) == 3).all()  # each SDE branch is credited by its 3 strides
    assert sg.leaf_group.unique().numel() == P * 3 * 3
    tr, _, _ = run("tree")
    per_depth = {int(d): tr.transition_leaves[tr.node_depth[tr.owner] == d].sum(1).unique().tolist()
                 for d in tr.node_depth[tr.owner].unique()}
    assert per_depth == {1: [4], 2: [2], 3: [1]}  # a depth-k node is credited by the leaves below it
    assert (tr.leaf_row.bincount() == 8).all()


@pytest.mark.parametrize("name", ["independent", "window_shared", "branches", "tree"])
def test_zero_noise_reproduces_the_ode(name):
    velocity = toy_velocity()
    rollout, x0, rows = run(name, schedule=zero(), velocity=velocity)
    assert rollout.num_transitions == 0
    # every leaf equals the plain Euler ODE from its root's noise (G²RPO's strided leaves: next test)
    for leaf, row in zip(rollout.leaves, rollout.leaf_row):
        expect = [euler_ode(lambda x, s: velocity(x, s.view(1), row.view(1)), s0[None], SIGMAS)[0]
                  for s0 in x0[rows == row]]
        assert any(torch.allclose(leaf, e, atol=1e-5) for e in expect)


def test_zero_noise_strided_leaves_follow_their_grids():
    velocity = toy_velocity()
    rollout, x0, _ = run("singular", schedule=zero(), velocity=velocity)
    s = SIGMAS.tolist()
    k, lam = 1, 3
    grid = SIGMAS[:k + 2].tolist() + [s[i] for i in range(k + 1 + lam, T, lam)] + [0.0]
    expect = euler_ode(lambda x, sig: velocity(x, sig.view(1), torch.tensor([0])), x0[:1], torch.tensor(grid))[0]
    assert any(torch.allclose(leaf, expect, atol=1e-5) for leaf in rollout.leaves[rollout.leaf_row == 0])


@pytest.mark.parametrize("name", list(plans()))
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.kind)
def test_rescoring_is_on_policy(name, schedule):
    """Re-scoring the stored transitions under the unchanged model: ratio 1 in any batch size (up to fp32
    rounding: a matmul over another batch layout may pick another kernel)."""
    velocity = toy_velocity()
    rollout, _, _ = run(name, schedule=schedule, velocity=velocity)
    if rollout.num_transitions == 0:
        pytest.skip("no stochastic steps")
    v = velocity(rollout.x, rollout.sigma, rollout.row)
    again = step(v, rollout.x, rollout.sigma, rollout.sigma_next, schedule=schedule, prev_sample=rollout.x_next,
                 noise_scale=rollout.scale)
    torch.testing.assert_close(torch.exp(again.logp - rollout.logp), torch.ones_like(rollout.logp), rtol=0, atol=1e-5)
    chunked = torch.cat([step(velocity(rollout.x[i:i + 5], rollout.sigma[i:i + 5], rollout.row[i:i + 5]),
                              rollout.x[i:i + 5], rollout.sigma[i:i + 5], rollout.sigma_next[i:i + 5],
                              schedule=schedule, prev_sample=rollout.x_next[i:i + 5],
                              noise_scale=rollout.scale[i:i + 5]).logp
                         for i in range(0, rollout.num_transitions, 5)])
    assert torch.allclose(chunked, rollout.logp, atol=1e-5)
    small, _, _ = run(name, schedule=schedule, velocity=velocity, max_batch=3)
    assert torch.allclose(small.logp, rollout.logp, atol=1e-5) and small.nfe == rollout.nfe


def test_same_seed_same_rollout():
    a, _, _ = run("tree", seed=4)
    b, _, _ = run("tree", seed=4)
    c, _, _ = run("tree", seed=5)
    assert torch.equal(a.leaves, b.leaves) and not torch.equal(a.leaves, c.leaves)


def test_tree_noise_rises_with_depth_and_pruning():
    tr, _, _ = run("tree")
    depth = tr.node_depth[tr.owner]
    assert tr.scale[depth == 1].max() < tr.scale[depth == 3].min()
    roots, rows = tree(SIGMAS, P, [0, 2, 4], train_depths={2, 3})
    pruned = run_plan(toy_velocity(), roots, rows, torch.randn(len(roots), 6), flow_grpo(), torch.Generator())
    assert set(pruned.node_depth[pruned.owner].tolist()) == {2, 3}
    with pytest.raises(ValueError, match="ODE steps"):
        tree(SIGMAS, P, [1, 5], sde_steps=[1, 2])


# ---------------------------------------------------------------- SDE marginals

MIX_MEANS = torch.tensor([[-2.0, 0.0], [2.0, 1.0]])
MIX_STD = torch.tensor([0.3, 0.5])
MIX_WEIGHTS = torch.tensor([0.3, 0.7])


def mixture_velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact rectified-flow velocity E[ε - x0 | x_σ = x] of a two-component Gaussian mixture."""
    s = sigma.view(-1, 1, 1) if sigma.ndim else sigma
    mu = (1 - s) * MIX_MEANS  # [B?,K,D]
    var = ((1 - s) ** 2 * MIX_STD.view(-1, 1) ** 2 + s ** 2)  # per component
    diff = x.unsqueeze(-2) - mu
    logw = MIX_WEIGHTS.log() - 0.5 * (diff ** 2 / var).sum(-1) - diff.shape[-1] / 2 * var.squeeze(-1).log()
    w = logw.softmax(-1).unsqueeze(-1)
    e_eps = s * diff / var
    e_x0 = MIX_MEANS + (1 - s) * MIX_STD.view(-1, 1) ** 2 * diff / var
    return (w * (e_eps - e_x0)).sum(-2)


@pytest.mark.parametrize("schedule", [zero(), flow_grpo(0.7), dance(0.3)], ids=lambda s: s.kind)
def test_sde_marginals_match_the_target(schedule):
    """Fixed seeds, 20k samples, 100 steps: the final samples have the mixture's mode weights and moments.
    (CPS is left out: its noise does not shrink with the step, so it is not a discretised marginal-preserving
    SDE; it re-noises a posterior-mean estimate, which blurs modes.)"""
    n, steps = 20000, 100
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g)
    sigmas = torch.linspace(1, 0, steps + 1)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v = mixture_velocity(x, s.expand(n))
        x = step(v, x, s, s_next, noise=torch.randn(n, 2, generator=g), schedule=schedule).x_next
    right = x[:, 0] > 0
    assert abs(right.float().mean().item() - 0.7) < 0.02
    for k, mask in enumerate([~right, right]):
        assert torch.allclose(x[mask].mean(0), MIX_MEANS[k], atol=0.06)
        assert torch.allclose(x[mask].std(0), MIX_STD[k].expand(2), rtol=0.1)


def test_rollout_with_the_toy_generator_is_batch_size_invariant(toy_generator):
    """Through a real model with CFG: the stored log-probs do not depend on how the rounds are batched, and
    re-scoring all transitions in one batch gives a ratio of 1 up to fp32 rounding."""
    gen = toy_generator
    cond = gen.encode(["a handwritten seven", "the digit 2"])
    velocity = lambda x, s, r: gen.velocity(x, s, cond.select(r), guidance=3.0)  # noqa: E731
    roots, rows = tree(gen.sigmas(6), 2, [1, 3], branching=2, sde_steps=[1, 2, 3, 4])
    x0 = gen.initial_noise(len(roots), torch.Generator().manual_seed(0))
    with torch.no_grad():
        big = run_plan(velocity, roots, rows, x0, flow_grpo(0.7), torch.Generator().manual_seed(0))
        small = run_plan(velocity, roots, rows, x0, flow_grpo(0.7), torch.Generator().manual_seed(0), max_batch=1)
        v = velocity(big.x, big.sigma, big.row)
    again = step(v, big.x, big.sigma, big.sigma_next, schedule=flow_grpo(0.7), prev_sample=big.x_next,
                 noise_scale=big.scale)
    assert big.nfe == small.nfe and big.num_transitions == 2 * (2 * 2 + 4 * 2)
    assert torch.allclose(small.logp, big.logp, atol=1e-4)
    assert torch.allclose(torch.exp(again.logp - big.logp), torch.ones_like(big.logp), atol=1e-4)


def test_dpm_solver_pp_matches_diffusers_on_its_flow_grid():
    """Our DPM-Solver++(2M) in flow coordinates == diffusers' DPMSolverMultistepScheduler (flow sigmas,
    flow_prediction, lower-order final step) on the scheduler's own grid; order 2 beats Euler on few steps."""
    from diffusers import DPMSolverMultistepScheduler

    from flowalign.samplers.ode import dpm_solver_pp, euler_ode

    torch.manual_seed(0)
    weight = torch.randn(6, 6) * 0.3

    def velocity(x, sigma):
        return torch.tanh(x @ weight) + sigma * x

    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
                                            algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True)
    scheduler.set_timesteps(8)
    x = torch.randn(3, 6)
    theirs = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        theirs = scheduler.step(velocity(theirs, scheduler.sigmas[i]), t, theirs).prev_sample
    ours = dpm_solver_pp(velocity, x, scheduler.sigmas)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    fine = euler_ode(velocity, x, torch.linspace(0.9, 0, 2001))
    coarse = torch.linspace(0.9, 0, 6)
    assert (dpm_solver_pp(velocity, x, coarse) - fine).abs().max() < (euler_ode(velocity, x, coarse) - fine).abs().max()
