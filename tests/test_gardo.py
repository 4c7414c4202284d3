"""GARDO: the rank uncertainty, the gate, the risk compensator, the diversity-aware advantage (on pixels and on an
encoder's embeddings) and both reset tests against hand computations; the modifier switched off equals plain
Flow-GRPO; its state survives a checkpoint. The DINOv3 features on a tiny checkpoint: tests/test_gardo_dinov3.py."""
from __future__ import annotations

import pytest
import torch

from flowalign.config import load_config
from flowalign.modifiers.gardo import (
    GARDOOptions,
    ResetTest,
    RiskCompensator,
    descending_ranks,
    diversity_advantages,
    encoder_features,
    gate,
    uncertainty,
)
from flowalign.training import make_trainer
from flowalign.training.lora import trainable_state
from flowalign.typed import ConfigError

CONFIG = "configs/toy/digits_uncapped_gardo.yaml"
SMALL = ["train.prompts_per_iteration=2", "flow_grpo.group_size=4", "train.steps=4", "train.eval_prompts=0",
         "monitor.every=0", "train.updates_per_iteration=1"]


def test_ranks_and_uncertainty_by_hand():
    """main (0.9, 0.1, 0.5, 0.3) ranks (1, 4, 2, 3); the auxiliaries rank (4, 1, 2, 3) and (4, 1, 3, 2), mean
    (4, 1, 2.5, 2.5); u = mean auxiliary rank - main rank = (3, -3, 0.5, -0.5); the code's sign negates it."""
    assert descending_ranks(torch.tensor([0.2, 0.9, 0.5])).tolist() == [3, 1, 2]
    assert descending_ranks(torch.tensor([1.0, 1.0, 0.0])).tolist() == [1, 2, 3]  # ties: the earlier first
    main = torch.tensor([0.9, 0.1, 0.5, 0.3])
    aux = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.2, 0.8, 0.4, 0.6]])
    assert uncertainty(main, aux).tolist() == [3.0, -3.0, 0.5, -0.5]
    assert uncertainty(main, aux, "auxiliaries_ahead").tolist() == [-3.0, 3.0, -0.5, 0.5]
    skipped = uncertainty(torch.tensor([0.9, float("nan"), 0.5]), aux[:, :3])
    # ranked among the valid two: main (1, 2), auxiliaries (2, 1) and (2, 1)
    assert skipped[1] == float("-inf") and skipped[[0, 2]].tolist() == [1.0, -1.0]


def test_the_gate_takes_the_top_of_the_non_negative_uncertainties():
    """Non-negative u (0, 1, 2, 3, 4): the 50th percentile is 2, so 3 and 4 are gated; the 90th is 3.6."""
    u = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, -1.0])
    assert gate(u, 0.5).tolist() == [False, False, False, True, True, False]
    assert gate(u, 0.1).tolist() == [False, False, False, False, True, False]
    assert not gate(torch.tensor([-1.0, -2.0]), 0.1).any()


def test_the_risk_compensator_by_hand():
    """0.1 at the start; x1.1 above the window's maximum, x0.9 below its minimum, unchanged inside; kept in
    [0.02, 0.2]; the window holds the last gate_window values."""
    c = RiskCompensator(GARDOOptions(gate_window=2))
    assert [round(c.update(x), 6) for x in (1.0, 2.0, 1.5, 0.5, 1.0)] == [0.1, 0.11, 0.11, 0.099, 0.099]
    for x in range(10, 40):
        c.update(float(x))
    assert c.fraction == 0.2


def test_diversity_advantages_by_hand():
    """Rewards (1, 2, 3), features (1,0), (0,1), (0.6,0.8): cosine distances 1, 0.4, 0.2, nearest (0.4, 0.2, 0.2),
    mean 0.2667; centred (-1, 0, 1): the two at or above the mean are scaled by 0.2/0.2667 = 0.75 ->
    (-1, 0, 0.75). A skipped sample gets 0; a group of one gets its centred reward, 0."""
    rewards = torch.tensor([1.0, 2.0, 3.0, float("nan"), 5.0])
    groups = torch.tensor([0, 0, 0, 0, 1])
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0], [1.0, 0.0]])
    adv = diversity_advantages(rewards, groups, features, torch.isfinite(rewards))
    assert adv.tolist() == pytest.approx([-1.0, 0.0, 0.75, 0.0, 0.0], abs=1e-6)


def test_diversity_advantages_on_an_encoders_embeddings_by_hand():
    """An encoder's embeddings (2,0), (0,3), (3,4) are normalised to (1,0), (0,1), (0.6,0.8), the features of the
    test above: the same advantages (-1, 0, 0.75); taken two images at a time; a NaN embedding counts 0."""
    embeddings = torch.tensor([[2.0, 0.0], [0.0, 3.0], [3.0, 4.0], [float("nan"), 1.0]])
    media = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    seen = []
    embed = lambda images: seen.append(len(images)) or embeddings[images[:, 0, 0, 0].long()]  # noqa: E731
    features = encoder_features(embed, media, chunk=2)
    assert seen == [2, 2]
    assert torch.allclose(features, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.0, 1.0]]), atol=1e-6)
    rewards, groups = torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3, dtype=torch.long)
    adv = diversity_advantages(rewards, groups, features[:3], torch.ones(3, dtype=torch.bool))
    assert adv.tolist() == pytest.approx([-1.0, 0.0, 0.75], abs=1e-6)


def feed(test: ResetTest, steps: list[list[tuple[list[float], list[float]]]]) -> ResetTest:
    """Micro-batches (per-transition KL, gate) of each optimizer step, then the step's end."""
    for micro_batches in steps:
        for kl, flags in micro_batches:
            test.add(torch.tensor(kl), torch.tensor(flags))
        test.end_step()
    return test


def test_the_two_reset_tests_by_hand():
    """Threshold 3e-4 (KLs in units of 1e-4 below).
    A: one step, micro-batches (4, 4 gated) and (5, 5 not gated): gated KLs 4 and 0, step mean 2; the
    iteration's mean over gated transitions 4: only ``iteration`` resets.
    B: step 1 one micro-batch (8 gated, 9 not): 8; step 2 one micro-batch (1, 1, 1 gated): 1; the iteration's
    mean (8+1+1+1)/4 = 2.75: only ``optimizer_step`` resets (step 1 passed).
    C: two processes, step means (2, 5) here and (6, 0) there average to (4, 2.5): reset; with (3, 0) there,
    (2.5, 2.5): none, though this process's step 2 passed alone."""
    e = 1e-4
    a = [[([4 * e, 4 * e], [1.0, 1.0]), ([5 * e, 5 * e], [0.0, 0.0])]]
    b = [[([8 * e, 9 * e], [1.0, 0.0])], [([e, e, e], [1.0, 1.0, 1.0])]]
    alone = lambda t, how: t  # noqa: E731 - one process: the reduction changes nothing
    for steps, resets in ((a, {"iteration": True, "optimizer_step": False}),
                          (b, {"iteration": False, "optimizer_step": True})):
        for mode, expected in resets.items():
            assert feed(ResetTest(mode, 3e-4), steps).crossed(alone) is expected, (mode, steps)
    test = feed(ResetTest("optimizer_step", 3e-4), [[([2 * e], [1.0])], [([5 * e], [1.0])]])
    assert [round(float(m) / e, 6) for m in test.step_means] == [2.0, 5.0]
    for other, expected in (([6 * e, 0.0], True), ([3 * e, 0.0], False)):
        two = lambda t, how, other=other: (t + torch.tensor(other)) / 2 if how == "mean" else None  # noqa: E731
        assert test.crossed(two) is expected
    test.clear()
    assert not test.crossed(alone) and test.step_means == []
    restored = ResetTest("optimizer_step", 3e-4)
    restored.load(feed(ResetTest("optimizer_step", 3e-4), b).state())
    assert restored.crossed(alone)


def lora_after(tmp_path, name: str, overrides: list[str], iterations: int = 2) -> dict[str, torch.Tensor]:
    cfg = load_config(CONFIG, [*SMALL, f"train.iterations={iterations}", "train.checkpoint_every=0", *overrides,
                               f"output_dir={tmp_path / name}"])
    trainer = make_trainer(cfg)
    trainer.fit(progress=False)
    return trainer_weights(trainer)


def trainer_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainable_state(trainer.gen.trainable_module, True).items()}


@pytest.mark.slow
def test_switched_off_it_is_flow_grpo_and_on_it_trains_differently(tmp_path):
    """beta 0 and no diversity term: the same LoRA as Flow-GRPO without the modifier, bit for bit; with the
    gated KL and the diversity-aware advantages, another one."""
    plain = lora_after(tmp_path, "plain", ["modifiers.gardo=null"])
    off = lora_after(tmp_path, "off", ["modifiers.gardo.beta=0", "modifiers.gardo.diversity=false"])
    on = lora_after(tmp_path, "on", [])
    assert all(torch.equal(plain[k], off[k]) for k in plain)
    assert not all(torch.equal(plain[k], on[k]) for k in plain)


@pytest.mark.slow
def test_a_resumed_run_keeps_the_reference_and_the_gate(tmp_path):
    """Interrupted after iteration 3 and resumed: the same LoRA after 5 iterations as the uninterrupted run (the
    reference copy, reset at iteration 2, the gate's fraction and window, and the pending KL travel in the
    checkpoint; resets forced every other iteration, on 2 and 4)."""
    settings = ["modifiers.gardo.kl_threshold=1e9", "modifiers.gardo.reset_every=1", "modifiers.gardo.beta=1",
                "modifiers.gardo.gate_fraction=0.2", "train.checkpoint_every=3"]
    whole = lora_after(tmp_path, "whole", settings, iterations=5)
    cfg = lambda n: load_config(CONFIG, [*SMALL, f"train.iterations={n}", *settings,  # noqa: E731
                                         f"output_dir={tmp_path / 'parts'}"])
    first = make_trainer(cfg(3))
    first.fit(progress=False)
    assert first.modifiers[0].last_reset == 2
    resumed = make_trainer(cfg(5))
    resumed.fit(resume="latest", progress=False)
    assert resumed.modifiers[0].last_reset == 4
    weights = trainer_weights(resumed)
    assert all(torch.equal(whole[k], weights[k]) for k in whole)


@pytest.mark.parametrize("overrides, message", [
    (["modifiers.gardo.auxiliaries=[]"], "modifiers.gardo.auxiliaries: the gate ranks samples by other rewards too"),
    (["modifiers.gardo.auxiliaries=[toy/nothing]"], "modifiers.gardo.auxiliaries: unknown reward 'toy/nothing'"),
    (["modifiers.kl.beta=0.1"], "modifiers.gardo has its own \\(gated\\) KL: leave modifiers.kl out"),
    (["train.lora_rank=0"], "modifiers.gardo keeps its reference as a LoRA copy"),
    (["modifiers.gardo.gate_fraction=0.5"], "expected gate_min <= gate_fraction <= gate_max"),
    (["modifiers.gardo.features=toy/nothing"], "modifiers.gardo.features: unknown encoder 'toy/nothing'"),
    (["modifiers.gardo.features=toy/ink"], "modifiers.gardo.features: reward 'toy/ink' cannot embed images"),
    (["modifiers.gardo.reset_test=epoch"], "modifiers.gardo.reset_test: expected one of 'iteration', "),
    (["method=dance_grpo", "flow_grpo=null"], "modifiers.gardo \\(GARDO\\) does not combine with method dance_grpo"),
])
def test_bad_gardo_settings_are_one_line_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [*overrides, f"output_dir={tmp_path}"])
