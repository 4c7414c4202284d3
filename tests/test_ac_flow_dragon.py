"""AC-Flow (critic-weighted flow matching, W2 to the base), ORW-CFM-W2, and DRAGON on the toy digits.

Measured (12 iterations, 60 held-out prompts and seeds, bold digits; base 0.664, eval-seed std 0.004; the guided
velocity fitted, as sampled with CFG 3): AC-Flow (alpha 0.1) -> 0.797, without W2 -> 0.779, alpha 1 -> 0.695;
the critic's explained variance on fresh points rises from ~0 to 0.3-0.6 after the 3 warm-up iterations;
DRAGON (paired, DPO) -> 0.886.
"""
import pytest
import torch

from flowalign import rewards
from flowalign.config import ConfigError, load_config
from flowalign.inference import generate
from flowalign.methods import ac_flow, dragon
from flowalign.training import make_trainer
from flowalign.training.flow_matching import FlowMatchingTrainer
from flowalign.training.lora import adapters_disabled, trainable_state
from flowalign.training.report import heldout_prompts
from flowalign.training.run import train

EVAL = ["train.eval_prompts=60", "train.eval_steps=10", "train.checkpoint_every=0"]


def small(method: str) -> list[str]:
    """A tiny run of ``method``: 2 prompts x 2 samples, 4 steps, 2 noise levels per sample."""
    return ["train.prompts_per_iteration=2", f"{method}.group_size=2", "train.steps=4", "train.eval_prompts=0",
            "train.checkpoint_every=0", f"{method}.fm_draws=2"]


def trainer(config: str, method: str, tmp_path, *overrides: str):
    return make_trainer(load_config(config, small(method) + [f"output_dir={tmp_path}", *overrides]))


# ---------------------------------------------------------------- the parts

def test_shaping_advantages_and_weights():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    per_group = ac_flow.shape_rewards(r, groups)
    torch.testing.assert_close(per_group[:3], per_group[3:])  # scale-free within each group
    assert ac_flow.shape_rewards(r, bound="tanh", bound_value=1.0).abs().max() < 1
    assert ac_flow.shape_rewards(r * 100, bound="clip", bound_value=0.5).abs().max() == 0.5
    adv = ac_flow.clipped_advantages(torch.tensor([3.0, -3.0, 0.5]), torch.tensor([0.0, 0.0, 1.0]), 2.0)
    assert torch.equal(adv, torch.tensor([2.0, -2.0, -0.5]))
    w = ac_flow.advantage_weights(torch.tensor([0.0, 1.0, 2.0]), beta=1.0, normalize=True)
    assert torch.isclose(w.mean(), torch.tensor(1.0)) and w[2] / w[1] == pytest.approx(2.718281828, rel=1e-5)
    # ORW-CFM-W2: no critic, no clipping, w = exp(beta * r)
    raw = torch.tensor([0.2, 0.9])
    torch.testing.assert_close(ac_flow.advantage_weights(ac_flow.clipped_advantages(raw, None, 0.0), 0.5, False),
                               torch.exp(0.5 * raw))
    assert ac_flow.explained_variance(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert ac_flow.explained_variance(torch.tensor([1.5, 1.5]), torch.tensor([1.0, 2.0])) == 0.0


@pytest.mark.parametrize("shape", [(1, 16, 16), (1, 4, 16, 16), (2, 64)])
def test_critic_takes_image_video_and_audio_latents(shape):
    critic = ac_flow.Critic(shape, text_dim=8, width=8)
    values = critic(torch.randn(3, *shape), torch.rand(3), torch.randn(3, 8))
    assert values.shape == (3,) and torch.isfinite(values).all()


def test_dragon_sets_and_losses():
    rewards_ = torch.tensor([0.1, 0.5, 0.7, 0.7, 0.9, 0.2])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    winners, losers = dragon.paired_sets(rewards_, groups)
    assert winners.tolist() == [1, 4] and losers.tolist() == [0, 5]  # the tied group is dropped
    assert dragon.unpaired_sets(rewards_).tolist() == [False, False, True, True, True, False]
    # greedy swaps: the set reward is the sum of members' values; swapping puts each pair's best in D+
    values = torch.tensor([0.0, 5.0, 3.0, 1.0, 2.0, 4.0])
    pairs = torch.tensor([[0, 1], [2, 3], [4, 5]])
    positive, negative = dragon.greedy_set_swaps(lambda idx: float(values[idx].sum()), pairs)
    assert positive.tolist() == [1, 2, 5] and negative.tolist() == [0, 3, 4]
    # a set reward that prefers diversity: D+ = {1, 3, 5} spread out beats any other choice
    spread = lambda idx: float(values[idx].std())  # noqa: E731
    positive, _ = dragon.greedy_set_swaps(spread, pairs)
    assert spread(positive) >= max(spread(torch.tensor([a, b, c])) for a in (0, 1) for b in (2, 3) for c in (4, 5))
    # DPO: lower error on the winner than on the loser -> lower loss; KTO: same direction per set
    assert dragon.dpo_loss(torch.tensor([-0.01]), torch.tensor([0.01]), 100) < dragon.dpo_loss(
        torch.tensor([0.01]), torch.tensor([-0.01]), 100)
    pos = torch.tensor([True, False])
    assert dragon.kto_loss(torch.tensor([-0.01, 0.01]), pos, 100) < dragon.kto_loss(
        torch.tensor([0.01, -0.01]), pos, 100)
    v, v_ref, u = torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3)
    assert torch.equal(dragon.relative_errors(v, v_ref, u), torch.ones(2))


# ---------------------------------------------------------------- the trainers

def test_make_trainer_and_config_errors(tmp_path):
    orw = trainer("configs/toy/digits_orw_cfm_w2.yaml", "orw_cfm_w2", tmp_path / "orw")
    assert isinstance(orw, FlowMatchingTrainer) and orw.method.critic is None
    stats, _ = orw.run_iteration(0)
    assert stats["fm_loss"] > 0 and stats["nfe"] == 4 * 4  # 4 steps x 2 prompts x 2 samples
    with pytest.raises(ConfigError, match="lora_rank"):
        load_config("configs/toy/digits_dragon.yaml", small("dragon") + ["train.lora_rank=0"])
    with pytest.raises(ConfigError, match="dragon.sets=greedy builds pairs: use dragon.loss=dpo"):
        load_config("configs/toy/digits_dragon.yaml", small("dragon") + ["dragon.sets=greedy", "dragon.loss=kto"])
    with pytest.raises(ConfigError, match="greedy needs one set reward"):  # known once the reward is loaded
        trainer("configs/toy/digits_dragon.yaml", "dragon", tmp_path / "g", "dragon.sets=greedy")


def test_flow_matching_fits_the_velocity_the_samples_come_from(tmp_path):
    """Samples drawn with CFG w are fitted by the guided velocity (both branches with the LoRA); fitting the
    conditional one to them compounds the guidance each iteration (measured on the 30-iteration configs:
    AC-Flow 0.66 -> 0.43, ORW-CFM-W2 -> 0.15 that way; guided: -> 0.85 and -> 0.68)."""
    tr = trainer("configs/toy/digits_ac_flow.yaml", "ac_flow", tmp_path / "a")
    cond = tr.gen.encode(["a seven", "the digit 3"], negative_prompt="")
    x, sigma = torch.randn(2, *tr.gen.latent_shape), torch.tensor([0.7, 0.3])
    with torch.no_grad():
        guided, conditional = tr.gen.velocity(x, sigma, cond, 3.0), tr.gen.velocity(x, sigma, cond, 1.0)
        assert torch.equal(tr.policy_velocity(x, sigma, cond), guided)
        assert (guided - conditional).abs().max() > 1e-2
        reference = tr.policy_velocity(x, sigma, cond, reference=True)
        with adapters_disabled(tr.gen.trainable_module, True):
            assert torch.equal(reference, tr.gen.velocity(x, sigma, cond, 3.0))
    music = trainer("configs/toy/music_dragon_fad.yaml", "dragon", tmp_path / "m")
    assert music.t.guidance == 1.0  # no CFG: the conditional velocity, as sampled


def test_ac_flow_resume_is_bitwise_with_the_critic(tmp_path):
    def run(name, *plan):
        for iterations, resume in plan:
            tr = trainer("configs/toy/digits_ac_flow.yaml", "ac_flow", tmp_path / name, "ac_flow.critic_warmup=1",
                         f"train.iterations={iterations}")
            tr.fit(resume=resume, progress=False)
            tr.save_checkpoint()
            tr.acc.end_training()
        return tr

    straight = run("straight", (4, None))
    split = run("split", (2, None), (4, "latest"))
    a, b = (trainable_state(t.gen.trainable_module, True) for t in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (t.acc.unwrap_model(t.method.critic).state_dict() for t in (straight, split))
    assert all(torch.equal(ca[k], cb[k]) for k in ca)


@pytest.mark.slow
def test_ac_flow_critic_warms_up_then_explains_variance(tmp_path):
    """The critic trains alone for its warm-up iterations, then explains a good part of the shaped rewards' variance
    on points it has not seen. (AC-Flow's learning, against its training-seed spread: tests/test_learning.py.)"""
    tr = make_trainer(load_config("configs/toy/digits_ac_flow.yaml", ["train.iterations=8", "train.eval_prompts=0",
                                                                      "train.checkpoint_every=0",
                                                                      f"output_dir={tmp_path}"]))
    history = tr.fit(progress=False)
    warm = [h["critic/explained_variance"] for h in history if h["iteration"] >= 5]
    assert all("fm_loss" not in h for h in history[:3]) and "fm_loss" in history[3]  # warm-up: critic only
    assert sum(warm) / len(warm) > 0.2, warm


def _distance_and_reward(trainer, prompts, meta) -> tuple[float, float]:
    """Mean L2 between the policy's and the base's samples from the same noise, and the policy's reward."""
    gen, reward = trainer.gen, rewards.load("toy/bold_digit")
    tuned = generate(gen, prompts, steps=10, guidance=3.0, seed=10007)
    with adapters_disabled(gen.trainable_module, True):
        base = generate(gen, prompts, steps=10, guidance=3.0, seed=10007)
    distance = (tuned - base).flatten(1).norm(dim=1).mean().item()
    return distance, reward.score(tuned, prompts, meta).mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_w2_term_keeps_samples_closer_to_the_base(tmp_path, seed):
    """The same run with and without the W2 bound: at a comparable reward, the W2 run's samples moved less from
    the base's (same noise). The distances vary a lot between training seeds, so the comparison is paired within
    a seed; the suite runs seed 0 (its time budget), and the rule held on each seed measured (0, 1, 2: L2 ratios
    0.86, 0.84, 0.88 against the 0.95 asserted)."""
    prompts, meta = heldout_prompts(40, None)
    base_reward = rewards.load("toy/bold_digit").score(generate(
        make_trainer(load_config("configs/toy/digits_ac_flow.yaml", ["train.eval_prompts=0",
                                                                     f"output_dir={tmp_path / 'b'}"])).gen,
        prompts, steps=10, guidance=3.0, seed=10007), prompts, meta).mean().item()
    results = {}
    for name, alpha in (("on", 0.1), ("off", 0.0)):
        tr = make_trainer(load_config("configs/toy/digits_ac_flow.yaml", [
            "train.iterations=8", "train.eval_prompts=0", "train.checkpoint_every=0", f"ac_flow.w2_weight={alpha}",
            f"train.seed={seed}", f"output_dir={tmp_path / name}"]))
        tr.fit(progress=False)
        results[name] = _distance_and_reward(tr, prompts, meta)
        tr.acc.end_training()
    (d_on, r_on), (d_off, r_off) = results["on"], results["off"]
    print(f"W2 on: L2 {d_on:.2f} at {r_on:.3f}; off: L2 {d_off:.2f} at {r_off:.3f}; base {base_reward:.3f}")
    gain_on, gain_off = r_on - base_reward, r_off - base_reward
    assert gain_on > 0.1 and gain_on > 0.7 * gain_off, results  # comparable rewards
    assert d_on < 0.95 * d_off, results


def test_dragon_unpaired_kto_runs(tmp_path):
    tr = trainer("configs/toy/digits_dragon.yaml", "dragon", tmp_path, "dragon.sets=unpaired", "dragon.loss=kto",
                 "train.prompts_per_iteration=4")
    before = {k: v.clone() for k, v in trainable_state(tr.gen.trainable_module, True).items()}
    batch = tr.sample(0)
    tr.score(batch)
    stats = tr.method.update(tr, batch)
    after = trainable_state(tr.gen.trainable_module, True)
    assert 0 <= stats["dragon_loss"] <= 1
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_dragon_lowers_the_music_toys_fad_to_its_exemplars(tmp_path):
    """DRAGON on the toy music model (no CFG), per-sample FAD to 64 real melodies as the instance reward, paired
    DPO: the dataset FAD of 256 held-out generations drops far below its evaluation-seed spread. Measured:
    11.0 -> 7.0 in 40 iterations (seeds 10007 / 10008: 11.22 / 10.79 before); the shipped config's greedy
    dataset-FAD sets reach 6.3."""
    from flowalign.training.report import EVAL_SEED

    tr = make_trainer(load_config("configs/toy/music_dragon_fad.yaml", [
        "dragon.sets=paired", "train.checkpoint_every=0", "train.eval_prompts=0", f"output_dir={tmp_path}"]))
    fad = rewards.load("toy/music_fad")
    prompts, _ = heldout_prompts(256, None, "music")

    def dataset_fad() -> list[float]:
        return [-float(fad.score_set(generate(tr.gen, prompts, steps=10, guidance=1.0, seed=EVAL_SEED + k)))
                for k in range(2)]

    before = dataset_fad()
    tr.fit(progress=False)
    after = dataset_fad()
    spread = abs(before[0] - before[1])
    gain = sum(before) / 2 - sum(after) / 2
    assert gain > 2.0 and gain > 5 * spread, (before, after)


@pytest.mark.slow
def test_music_training_report_writes_wav_clips(tmp_path):
    import wave

    train("configs/toy/music_dragon_fad.yaml", ["train.iterations=1", "train.prompts_per_iteration=4",
                                                "train.eval_prompts=4", "train.checkpoint_every=0",
                                                f"output_dir={tmp_path}"], progress=False, print_fn=lambda *_: None)
    clips = sorted((tmp_path / "report").glob("after*.wav"))
    assert len(clips) == 4
    with wave.open(str(clips[0])) as f:
        assert f.getframerate() == 8000 and f.getnframes() == 16000 and f.getsampwidth() == 2
