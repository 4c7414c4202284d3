"""MARBLE: the min-norm solver and the smoothed weights against hand computations; in a run, the update's gradient
is the balanced combination of the rewards' own gradients and agrees with each of them."""
from __future__ import annotations

import math

import pytest
import torch

from flowalign.config import load_config
from flowalign.training import make_trainer
from flowalign.training.marble import GradientBalance, min_norm_weights
from flowalign.typed import ConfigError


def gram(*vectors) -> torch.Tensor:
    g = torch.tensor(vectors, dtype=torch.float64)
    return g @ g.T


def test_min_norm_weights_by_hand():
    """(2,0) and (0,1): α1 = (g2-g1)·g2 / |g1-g2|² = 1/5, the point (0.4, 0.8). Two unit vectors: the midpoint.
    e1, e2, -e1: the hull holds 0 (weights 1/2 on e1 and -e1). e1, e2, (e1+e2)/√2: the midpoint of e1 and e2."""
    assert min_norm_weights(gram([2, 0], [0, 1])).tolist() == pytest.approx([0.2, 0.8])
    assert min_norm_weights(gram([1, 0], [-0.6, 0.8])).tolist() == pytest.approx([0.5, 0.5])
    alpha = min_norm_weights(gram([1, 0], [0, 1], [-1, 0])).tolist()
    assert alpha == pytest.approx([0.5, 0.0, 0.5])
    r = 1 / math.sqrt(2)
    assert min_norm_weights(gram([1, 0], [0, 1], [r, r])).tolist() == pytest.approx([0.5, 0.5, 0.0], abs=1e-6)


def test_the_balance_by_hand():
    """Weights 1 : 3 start ᾱ at (0.25, 0.75). Gradients (2,0), (0,1): unit vectors, α* = (0.5, 0.5); ρ 0.9:
    ᾱ = (0.275, 0.725); s = 0.275·2 + 0.725·1 = 1.275, c = (0.275·1.275/2, 0.725·1.275/1), so Σ c_k g_k =
    1.275·(0.275, 0.725). A reward with a zero gradient takes no part."""
    balance = GradientBalance({"a": 1.0, "b": 3.0}, momentum=0.9, every=1)
    assert balance.alpha == pytest.approx({"a": 0.25, "b": 0.75})
    star = balance.update({"a": torch.tensor([2.0, 0.0]), "b": torch.tensor([0.0, 1.0])})
    assert star == pytest.approx({"a": 0.5, "b": 0.5}) and balance.alpha == pytest.approx({"a": 0.275, "b": 0.725})
    c = balance.coefficients()
    assert c == pytest.approx({"a": 0.275 * 1.275 / 2, "b": 0.725 * 1.275})
    assert balance.update({"a": torch.zeros(2), "b": torch.tensor([0.0, 1.0])}) == {"a": 0.0, "b": 1.0}


@pytest.mark.slow
def test_the_update_is_the_balanced_gradient_and_serves_every_reward(tmp_path):
    """Two rewards that pull apart (bold ink, and the toy CLIP score of the prompt), ρ 0: the first update's
    gradient equals Σ_k c_k g_k of the rewards' own full gradients (the amortisation), and has a positive inner
    product with each of them (no reward's loss rises to first order), where the plain sum of advantages need
    not."""
    cfg = load_config("configs/toy/digits_flow_grpo.yaml", [
        "reward.weights={toy/bold_digit: 1, toy/clipscore: 1}", "reward.options={toy/bold_digit: {target_ink: 1}}",
        "reward.aggregate=marble", "reward.marble_momentum=0", "train.prompts_per_iteration=2",
        "flow_grpo.group_size=4", "train.steps=4", "train.eval_prompts=0", "train.updates_per_iteration=1",
        "flow_grpo.shuffle=false", "train.iterations=1", "train.checkpoint_every=0", f"output_dir={tmp_path}"])
    trainer = make_trainer(cfg)
    own, update = {}, []
    full_gradient, optimizer_step = trainer._full_gradient, trainer.optimizer_step

    def recording_gradient(batch, old_logp, advantages):
        g = full_gradient(batch, old_logp, advantages)
        own[len(own)] = g
        return g

    def recording_step():
        update.append(torch.cat([p.grad.detach().flatten() for p in trainer.params]))
        return optimizer_step()

    trainer._full_gradient, trainer.optimizer_step = recording_gradient, recording_step
    metrics, _ = trainer.run_iteration(0)
    c = list(trainer.balance.coefficients().values())
    combined = c[0] * own[0] + c[1] * own[1]
    assert torch.allclose(update[0], combined, rtol=1e-3, atol=1e-3 * float(combined.abs().max()))
    assert all(float(update[0] @ g) > 0 for g in own.values())
    assert metrics["marble/toy/bold_digit"] + metrics["marble/toy/clipscore"] == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.parametrize("method, config, normalised", [
    ("diffusion_nft", "configs/toy/digits_diffusion_nft.yaml", True),
    ("awm", "configs/toy/digits_awm.yaml", False)])
def test_the_forward_process_methods_train_the_balanced_gradient(tmp_path, method, config, normalised):
    """DiffusionNFT (the paper's base: its loss is affine in the optimality weight r, so r̄ = Σ c_k r_k / Σ c_k)
    and AWM (linear in the advantage at the sampling policy): the one update's gradient is the balanced
    combination of the rewards' own gradients (divided by Σ c_k for NFT) and agrees with each."""
    no_kl = [f"{method}.kl_weight=0"] + (["awm.ema_weight=0"] if method == "awm" else [])
    cfg = load_config(config, [
        "reward.weights={toy/bold_digit: 1, toy/clipscore: 1}", "reward.options={toy/bold_digit: {target_ink: 1}}",
        "reward.aggregate=marble", "reward.marble_momentum=0", "train.prompts_per_iteration=2",
        f"{method}.group_size=4", f"{method}.fm_draws=2", "train.steps=4", "train.eval_prompts=0",
        "train.updates_per_iteration=1", "train.iterations=1", "train.checkpoint_every=0", *no_kl,
        f"output_dir={tmp_path}"])
    trainer = make_trainer(cfg)
    own, update = [], []
    full_gradient, optimizer_step = trainer.full_gradient, trainer.optimizer_step
    trainer.full_gradient = lambda *a: own.append(full_gradient(*a)) or own[-1]

    def recording_step():
        update.append(torch.cat([p.grad.detach().flatten() for p in trainer.params]))
        return optimizer_step()

    trainer.optimizer_step = recording_step
    trainer.run_iteration(0)
    c = list(trainer.balance.coefficients().values())
    combined = (c[0] * own[0] + c[1] * own[1]) / (sum(c) if normalised else 1.0)
    assert torch.allclose(update[0], combined, rtol=1e-3, atol=1e-3 * float(combined.abs().max()))
    assert all(float(update[0] @ g) > 0 for g in own)


@pytest.mark.parametrize("overrides, message", [
    (["reward.aggregate=marble"], "reward.aggregate=marble balances several rewards: reward.weights names one"),
    (["reward.aggregate=marble", "reward.weights={toy/ink: 1, toy/size: 1}", "reward.on_error=skip"],
     "reward.aggregate=marble needs every reward's score of every sample: use reward.on_error=stop"),
    (["reward.aggregate=marble", "reward.weights={toy/ink: 1, toy/size: 0}"], "expected each above 0"),
    (["reward.aggregate=marble", "reward.weights={toy/ink: 1, toy/size: 1}", "method=dgpo", "flow_grpo=null"],
     "reward.aggregate=marble balances rewards through a loss linear in each sample's advantage: method dgpo's is "
     "not"),
])
def test_bad_marble_settings_are_one_line_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/toy/digits_flow_grpo.yaml", [*overrides, f"output_dir={tmp_path}"])
