"""The GRPO trainer on the toy world: on-policy ratio, learning, resume, faults, checkpoints."""
import json

import pytest
import torch

from flowalign.config import load_config
from flowalign.errors import FlowalignError
from flowalign.training import checkpoint as ckpt
from flowalign.training import make_trainer
from flowalign.training.lora import trainable_state

SMALL = ["train.prompts_per_iteration=2", "flow_grpo.group_size=4", "train.steps=4", "train.eval_prompts=0",
         "train.rollout_batch=8", "train.train_batch=8", "train.checkpoint_every=0"]


def trainer(tmp_path, *overrides, name="run"):
    cfg = load_config("configs/toy/digits_flow_grpo.yaml", SMALL + [f"output_dir={tmp_path / name}", *overrides])
    return make_trainer(cfg)


def scored_batch(tr, iteration=0):
    """One iteration's batch up to its advantages (no update)."""
    batch = tr.rollout(iteration)
    tr.score(batch)
    tr.advantages(batch)
    return batch


def first_ratios(tr) -> torch.Tensor:
    batch = scored_batch(tr)
    rollout = batch.rollout
    old = rollout.logp if tr.method.options.old_logp == "rollout" else tr.recompute_logp(batch)
    idx = torch.arange(min(tr.t.train_batch, rollout.num_transitions))
    with torch.no_grad():
        v = tr.velocity(batch, idx)
    from flowalign.samplers.kernels import step

    new = step(v, rollout.x[idx], rollout.sigma[idx], rollout.sigma_next[idx], schedule=tr.schedule,
               prev_sample=rollout.x_next[idx], noise_scale=rollout.scale[idx]).logp
    return torch.exp(new - old[idx])


def test_first_inner_step_is_exactly_on_policy(tmp_path):
    """Same batches as the rollout (or recomputed old log-probs): the ratio is exactly 1 before any update."""
    assert torch.equal(first_ratios(trainer(tmp_path, "flow_grpo.shuffle=false")), torch.ones(8))
    assert torch.equal(first_ratios(trainer(tmp_path, "flow_grpo.old_logp=recompute", "train.train_batch=5")),
                       torch.ones(5))


@pytest.mark.parametrize("options", [[], ["reward.normalize=running",
                                          "reward.weights={toy/bold_digit: 1, toy/ink: 1}"]])
def test_resume_is_bitwise_identical(tmp_path, options):
    """4 iterations straight == 2 iterations, a stop, a resume from the checkpoint, 2 more (with running reward
    statistics too: they are in the checkpoint)."""
    straight = trainer(tmp_path, "train.iterations=4", *options, name="straight")
    straight.fit(progress=False)
    first = trainer(tmp_path, "train.iterations=2", "train.checkpoint_every=2", *options, name="resumed")
    first.fit(progress=False)
    del first
    second = trainer(tmp_path, "train.iterations=4", "train.checkpoint_every=2", *options, name="resumed")
    second.fit(resume="latest", progress=False)
    assert second.reward.normalization_state() == straight.reward.normalization_state()
    a = trainable_state(straight.gen.trainable_module, True)
    b = trainable_state(second.gen.trainable_module, True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["reward/mean"] for h in straight.history] == [h["reward/mean"] for h in second.history]


def test_checkpoints_are_atomic_and_limited(tmp_path):
    root = tmp_path / "checkpoints"
    w = {"a": torch.ones(2)}
    for i in range(1, 6):
        ckpt.save_checkpoint(root, i, w, {}, {"history": []}, limit=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["checkpoint-4", "checkpoint-5"]
    (root / ".tmp-checkpoint-6").mkdir()  # a kill while writing checkpoint 6
    (root / "checkpoint-7").mkdir()  # a folder without a manifest is skipped
    warnings = []
    assert ckpt.resolve(root, "latest", warn=warnings.append).name == "checkpoint-5"
    assert warnings == [f"flowalign: warning: skipping {root / 'checkpoint-7'}: no manifest.json (incomplete, or "
                        "written by a flowalign without manifests)"]
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint folder"):
        ckpt.resolve(root, str(tmp_path / "nowhere"))


def test_reward_failure_policies(tmp_path, monkeypatch):
    from flowalign import rewards
    def broken(self, media, prompts=None, metadata=None):
        raise rewards.RewardError("reward toy/bold_digit: non-finite score nan for sample 3")

    tr = trainer(tmp_path, "train.iterations=1")
    monkeypatch.setattr(type(tr.reward), "score_all", broken)
    with pytest.raises(FlowalignError, match="reward failed at iteration 0 .*reward.on_error=skip"):
        tr.fit(progress=False)
    skip = trainer(tmp_path, "train.iterations=1", "reward.on_error=skip", name="skip")
    before = {k: v.clone() for k, v in trainable_state(skip.gen.trainable_module, True).items()}
    skip.fit(progress=False)  # every sample skipped: advantages 0, nothing learned, no crash
    after = trainable_state(skip.gen.trainable_module, True)
    assert all(torch.allclose(before[k], after[k]) for k in before)


def _checkpoint_weights(tmp_path, name: str, which: str) -> dict:
    return ckpt.load_checkpoint(tmp_path / name / "checkpoints" / which)[0]


def test_a_non_finite_loss_names_a_checkpoint_that_is_truly_good(tmp_path, monkeypatch):
    """NaN in iteration 1's second update (its first one already applied): nothing of iteration 1 is saved, and
    the checkpoint the error names holds iteration 0's weights exactly. Before anything was saved, it says so."""
    clean = trainer(tmp_path, "train.iterations=2", "train.checkpoint_every=1", "train.updates_per_iteration=2",
                    name="clean")
    clean.fit(progress=False)
    tr = trainer(tmp_path, "train.iterations=3", "train.checkpoint_every=1", "train.updates_per_iteration=2")
    real, calls = tr.loss, []

    def nan_in_the_second_update_of_iteration_1(batch, *args):
        loss, stats = real(batch, *args)
        calls.append(batch.iteration)
        return (loss * float("nan") if calls.count(1) == 3 else loss), stats  # 2 minibatches per update

    monkeypatch.setattr(tr, "loss", nan_in_the_second_update_of_iteration_1)
    with pytest.raises(FlowalignError, match=r"^loss is nan at iteration 1: stopped; the last good state is in "
                                             r".*checkpoint-1 \(resume with"):
        tr.fit(progress=False)
    assert ckpt.resolve(tmp_path / "run" / "checkpoints", "latest").name == "checkpoint-1"
    good, expected = _checkpoint_weights(tmp_path, "run", "checkpoint-1"), _checkpoint_weights(tmp_path, "clean",
                                                                                               "checkpoint-1")
    assert all(torch.equal(good[k], expected[k]) for k in expected)
    first = trainer(tmp_path, "train.iterations=1", name="first")
    monkeypatch.setattr(first, "loss", lambda *a: (lambda out: (out[0] * float("nan"), out[1]))(real(*a)))
    with pytest.raises(FlowalignError, match="no checkpoint was written before it"):
        first.fit(progress=False)


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    """An lr of 1e30 blows the weights up: the run stops with one line and every checkpoint on disk is finite."""
    tr = trainer(tmp_path, "train.iterations=4", "train.checkpoint_every=1", "train.lr=1e30",
                 "train.max_grad_norm=0")
    with pytest.raises(FlowalignError, match="stopped; "):
        tr.fit(progress=False)
    for folder in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints"):
        assert all(torch.isfinite(v).all() for v in ckpt.load_checkpoint(folder)[0].values()), folder


def test_kl_to_the_lora_off_base_is_zero_at_the_start(tmp_path):
    tr = trainer(tmp_path, "modifiers.kl.beta=0.04")
    batch = scored_batch(tr)
    _, stats = tr.loss(batch, torch.arange(8), batch.rollout.logp[:8])
    assert stats["kl"].item() == 0.0  # LoRA B starts at zero: policy == base


def test_bad_train_config_is_one_line(tmp_path):
    with pytest.raises(FlowalignError, match="train.cfg=false .* needs train.guidance=1"):
        load_config("configs/toy/digits_flow_grpo.yaml", ["train.cfg=false"])
    with pytest.raises(FlowalignError, match="unknown key 'train.learning_rate'"):
        trainer(tmp_path, "train.learning_rate=1")


def test_report_and_final_lora(tmp_path):
    from flowalign.training.run import train

    metrics = train("configs/toy/digits_flow_grpo.yaml",
                    SMALL[:-2] + ["train.iterations=2", "train.eval_prompts=10", "train.eval_steps=6",
                                  f"output_dir={tmp_path}"], progress=False, print_fn=lambda *_: None)
    report = tmp_path / "report"
    for name in ["before.png", "after.png", "reward_curve.png", "metrics.json"]:
        assert (report / name).stat().st_size > 0
    assert json.loads((report / "metrics.json").read_text())["reward_after"] == metrics["reward_after"]
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("options", [["train.mixed_precision=bf16"], ["train.gradient_checkpointing=true"],
                                     ["train.lora_rank=0", "train.lr=1e-5"], ["train.ema_decay=0.9"],
                                     ["flow_grpo.share_noise=true"], ["modifiers.fast.window_size=2"],
                                     ["modifiers.cps.noise_level=0.8"],
                                     ["modifiers.cps.noise_level=0.8", "modifiers.kl.beta=0.04"],
                                     ["modifiers.fast.window_size=2", "modifiers.flash.tail=paper"]])
def test_training_options_run(tmp_path, options):
    """Each option trains an iteration end to end and saves its final weights (bf16 autocast on CPU too)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # mixed precision is fixed per process state
    tr = trainer(tmp_path, "train.iterations=1", *options)
    history = tr.fit(progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in history[0].items() if k != "iteration")
    final = tr.save_final()
    assert (final / ("pytorch_lora_weights.safetensors" if tr.lora
                     else "diffusion_pytorch_model.safetensors")).is_file()
    AcceleratorState._reset_state(reset_partial_state=True)


def test_ctrl_c_finishes_the_iteration_then_checkpoints_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    """SIGINT in the middle of iteration 1's update: the iteration finishes, checkpoint-2 holds iterations 0-1,
    the run exits 130; resumed, it ends with the uninterrupted run's weights bit for bit."""
    import os
    import signal

    straight = trainer(tmp_path, "train.iterations=3", "train.updates_per_iteration=2", name="straight")
    straight.fit(progress=False)
    tr = trainer(tmp_path, "train.iterations=3", "train.updates_per_iteration=2")
    real, calls = tr.loss, []

    def interrupted(batch, *args):
        calls.append(batch.iteration)
        if calls.count(1) == 1:  # between iteration 1's two updates
            os.kill(os.getpid(), signal.SIGINT)
        return real(batch, *args)

    monkeypatch.setattr(tr, "loss", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        tr.fit(progress=False)
    assert exit_info.value.code == 130 and calls.count(1) == calls.count(0) and 2 not in calls  # 1 ran whole
    assert "finishing iteration 1 first" in capsys.readouterr().out
    assert ckpt.resolve(tmp_path / "run" / "checkpoints", "latest").name == "checkpoint-2"
    resumed = trainer(tmp_path, "train.iterations=3", "train.updates_per_iteration=2")
    resumed.fit(resume="latest", progress=False)
    a = trainable_state(straight.gen.trainable_module, True)
    b = trainable_state(resumed.gen.trainable_module, True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_discards_the_unfinished_iteration(tmp_path, monkeypatch, capsys):
    """Ctrl-C twice (or an interrupt from elsewhere) mid-update: nothing of the iteration is saved."""
    tr = trainer(tmp_path, "train.iterations=3", "train.checkpoint_every=1", "train.updates_per_iteration=2")
    real, calls = tr.loss, []

    def interrupted(batch, *args):
        calls.append(batch.iteration)
        if calls.count(1) == 3:  # iteration 1's first update (2 minibatches) is applied
            raise KeyboardInterrupt
        return real(batch, *args)

    monkeypatch.setattr(tr, "loss", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        tr.fit(progress=False)
    assert exit_info.value.code == 130
    assert "interrupted during iteration 1: discarded; the last good state is in" in capsys.readouterr().out
    assert [c.name for c in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint-1"]


def test_tensorboard_scalars_and_samples(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tr = trainer(tmp_path, "train.iterations=2", "train.checkpoint_every=2")
    tr.fit(progress=False)
    tr.acc.end_training()
    events = EventAccumulator(str(tmp_path / "run"))
    found = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert found
    events = EventAccumulator(str(found[0].parent)).Reload()
    tags = events.Tags()
    for tag in ["reward/mean", "reward/std", "clip_fraction", "ratio_mean", "grad_norm", "nfe", "time/sampling"]:
        assert tag in tags["scalars"], tags
    assert "samples" in tags["images"]


def test_grpo_guard_ratio_is_one_on_policy_and_trains(tmp_path):
    """GRPO-Guard: with the policy unchanged the normalised ratio is exactly 1 (b = 0, logp = logp_old)."""
    from flowalign.algorithms.grpo.loss import guard_log_ratio
    from flowalign.samplers.kernels import step

    tr = trainer(tmp_path, "modifiers.grpo_guard={}", "flow_grpo.shuffle=false")
    batch = tr.rollout(0)
    rollout, idx = batch.rollout, torch.arange(8)
    with torch.no_grad():
        out = step(tr.velocity(batch, idx), rollout.x[idx], rollout.sigma[idx], rollout.sigma_next[idx],
                   schedule=tr.schedule, prev_sample=rollout.x_next[idx], noise_scale=rollout.scale[idx])
    log_r, delta_bar = guard_log_ratio(out.logp, rollout.logp[idx], out.mean, rollout.mean[idx], out.std,
                                       rollout.sigma[idx], rollout.sigma_next[idx])
    assert torch.equal(log_r, torch.zeros(8)) and bool(((0 < delta_bar) & (delta_bar < 1)).all())
    history = trainer(tmp_path, "modifiers.grpo_guard={}", "train.iterations=2", name="guard").fit(progress=False)
    assert all(torch.isfinite(torch.tensor(h["policy_loss"])) for h in history)


def test_grpo_guard_scales_each_sample_by_its_own_step():
    """Two samples at different steps, by hand: (σ, σ') = (0.8, 0.7), std 0.2, μ - μ_old = 0.02, logp - old = 0.05
    gives b = 0.0004 / (2·0.04) = 0.005, log r = 0.055·0.2 = 0.011, divisor Δσ = 0.1; (0.3, 0.1), std 0.1, 0.01,
    -0.02 gives b = 0.0001 / (2·0.01) = 0.005, log r = -0.015·0.1 = -0.0015, divisor 0.2. The same whatever
    the batch holds; the batch-mean scale (``scale: batch``) depends on the other sample."""
    from flowalign.algorithms.grpo.loss import guard_log_ratio

    logp, old = torch.tensor([0.05, -0.02]), torch.zeros(2)
    mean, old_mean = torch.stack([torch.full((4,), 0.02), torch.full((4,), 0.01)]), torch.zeros(2, 4)
    std, sigma, sigma_next = torch.tensor([0.2, 0.1]), torch.tensor([0.8, 0.3]), torch.tensor([0.7, 0.1])
    log_r, divisor = guard_log_ratio(logp, old, mean, old_mean, std, sigma, sigma_next)
    assert torch.allclose(log_r, torch.tensor([0.011, -0.0015]), atol=1e-7)
    assert torch.allclose(divisor, torch.tensor([0.1, 0.2]))
    alone, _ = guard_log_ratio(logp[:1], old[:1], mean[:1], old_mean[:1], std[:1], sigma[:1], sigma_next[:1])
    assert torch.allclose(alone, log_r[:1])
    mixed, _ = guard_log_ratio(logp, old, mean, old_mean, std, sigma, sigma_next, "batch")
    alone, _ = guard_log_ratio(logp[:1], old[:1], mean[:1], old_mean[:1], std[:1], sigma[:1], sigma_next[:1], "batch")
    assert torch.allclose(alone, log_r[:1]) and not torch.allclose(mixed[:1], alone)


def test_reward_conditioned_clip_bounds():
    from flowalign.algorithms.grpo.loss import clipped_policy_loss, reward_conditioned_clip

    adv = torch.tensor([0.0, 0.5, 3.0, -3.0])
    clip = reward_conditioned_clip(adv, 1e-4, 1e-3, 1.0)
    assert clip[0] == 1e-4 and clip[1] < clip[2] and clip[2] == clip[3] and (clip <= 1e-3).all()
    logp = torch.log(torch.full((4,), 1.0005))  # every ratio 1.0005: clipped only where the bound is < 5e-4
    _, stats = clipped_policy_loss(logp, torch.zeros(4), adv, clip)
    assert stats["clip_fraction"].item() == 0.25  # only A = 0 keeps the low bound 1e-4


def recorded_gradients(tr) -> list[torch.Tensor]:
    """Record every optimizer update's gradient (before clipping) of a trainer."""
    grads, step = [], tr.optimizer_step

    def recording_step():
        grads.append(torch.cat([p.grad.detach().flatten() for p in tr.params if p.grad is not None]).clone())
        return step()

    tr.optimizer_step = recording_step
    return grads


def test_kl_changes_the_update_once_the_policy_has_moved(tmp_path):
    """KL to the LoRA-off base is 0 with a zero gradient at the start (LoRA B = 0), so iteration 0's updates are
    the same with and without it; from iteration 1 the policy differs from the base and β > 0 changes them."""
    runs = {}
    for beta in (0.0, 1.0):
        tr = trainer(tmp_path, "train.iterations=2", "train.updates_per_iteration=1",
                     *([f"modifiers.kl.beta={beta}"] if beta else []), name=f"beta{beta}")
        grads = recorded_gradients(tr)
        runs[beta] = (tr.fit(progress=False), grads)
    (_, plain), (kl_history, kl) = runs[0.0], runs[1.0]
    torch.testing.assert_close(kl[0], plain[0], rtol=0, atol=1e-7)
    assert kl_history[0]["kl"] == 0.0 and kl_history[1]["kl"] > 0
    assert (kl[1] - plain[1]).norm() > 1e-3 * plain[1].norm()


def test_bf16_autocast_is_engaged_where_asked(tmp_path):
    """With train.mixed_precision=bf16 the policy's layers compute in bf16 during training (fp32 otherwise),
    while the log-probs stay fp32."""
    from accelerate.state import AcceleratorState

    seen = {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(reset_partial_state=True)
        tr = trainer(tmp_path, "train.iterations=1", f"train.mixed_precision={precision}", name=precision)
        dtypes = set()
        linear = next(m for m in tr.gen.trainable_module.modules() if isinstance(m, torch.nn.Linear))
        handle = linear.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
        batch = tr.rollout(0)
        tr.score(batch)
        tr.advantages(batch)
        dtypes.clear()
        loss, _ = tr.loss(batch, torch.arange(4), batch.rollout.logp[:4])
        handle.remove()
        seen[precision] = (dtypes, loss.dtype, batch.rollout.logp.dtype)
    AcceleratorState._reset_state(reset_partial_state=True)
    assert seen["no"] == ({torch.float32}, torch.float32, torch.float32)
    assert seen["bf16"] == ({torch.bfloat16}, torch.float32, torch.float32)


def test_ema_weights_differ_from_the_live_ones_and_are_the_ones_saved(tmp_path):
    from safetensors.torch import load_file

    tr = trainer(tmp_path, "train.iterations=3", "train.ema_decay=0.5")
    tr.fit(progress=False)
    live = [p.detach().clone() for p in tr.params]
    shadow = [p.detach().clone() for p in tr.ema.shadow_params]
    assert any(not torch.equal(a, b) for a, b in zip(live, shadow))
    saved = load_file(str(tr.save_final() / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(live, tr.params))  # the live weights are restored after saving
    saved_values = sorted(v.flatten().sum().item() for v in saved.values())
    shadow_values = sorted(v.flatten().sum().item() for v in shadow)
    live_values = sorted(v.flatten().sum().item() for v in live)
    assert saved_values == pytest.approx(shadow_values, rel=1e-6, abs=1e-9)
    assert saved_values != pytest.approx(live_values, rel=1e-6, abs=1e-9)


def test_gradient_checkpointing_is_on_and_changes_no_gradient(tmp_path):
    """With train.gradient_checkpointing the transformer recomputes its blocks in the backward pass (diffusers'
    flag is set) and the first update's gradient is the plain run's."""
    grads = {}
    for flag in (False, True):
        tr = trainer(tmp_path, "train.iterations=1", "train.updates_per_iteration=1",
                     f"train.gradient_checkpointing={str(flag).lower()}", name=str(flag))
        assert tr.gen.trainable_module.is_gradient_checkpointing == flag
        grads[flag] = recorded_gradients(tr)
        tr.fit(progress=False)
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-4, atol=1e-6)


def test_final_lora_files_are_byte_identical_across_processes(tmp_path):
    """Two processes with different string hash seeds save the same LoRA: the same bytes (a set in the adapter
    metadata, ``target_modules``, used to be written in hash order)."""
    import subprocess
    import sys

    script = ("import sys; from flowalign.config import load_config; from flowalign.training import make_trainer; "
              f"cfg = load_config('configs/toy/digits_flow_grpo.yaml', {SMALL!r} + ['output_dir=' + sys.argv[1]]); "
              "make_trainer(cfg).save_final()")
    files = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed
        subprocess.run([sys.executable, "-c", script, str(out)], check=True,
                       env={**__import__("os").environ, "PYTHONHASHSEED": hash_seed})
        files.append((out / "final" / "pytorch_lora_weights.safetensors").read_bytes())
    assert files[0] == files[1]
