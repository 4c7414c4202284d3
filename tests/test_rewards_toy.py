"""Toy rewards: the attributes measure what they say, the classifier and tiny CLIP are meaningful, the
registry finds built-ins and entry-point plug-ins."""
import textwrap

import pytest
import torch
import torch.nn.functional as F

from flowalign import rewards
from flowalign.toy.data import load_digits
from flowalign.toy.prompts import caption


@pytest.fixture(scope="module")
def held_out():
    images, labels = load_digits("test")
    return ((images + 1) / 2).expand(-1, 3, -1, -1), labels  # RGB in [0,1], as generators decode


def test_registry_names_and_unknown():
    names = rewards.available()
    for name in ["toy/classifier", "toy/digit_match", "toy/ink", "toy/size", "toy/centered", "toy/symmetry",
                 "toy/clipscore", "clipscore"]:
        assert name in names
    with pytest.raises(rewards.RewardError, match="reward 'nope': unknown"):
        rewards.load("nope")


def test_classifier_rewards_judge_real_digits(held_out):
    images, labels = held_out
    prompts = [caption(int(d)) for d in labels]
    assert rewards.load("toy/digit_match").score(images, prompts).mean() > 0.95
    right = rewards.load("toy/classifier").score(images, prompts)
    wrong = rewards.load("toy/classifier").score(images, [caption((int(d) + 1) % 10) for d in labels])
    assert right.mean() > 0.9 and wrong.mean() < 0.1


def test_metadata_digit_overrides_prompt(held_out):
    images, labels = held_out
    r = rewards.load("toy/digit_match")
    meta = [{"digit": int(d)} for d in labels[:50]]
    assert r.score(images[:50], ["no digit named here"] * 50, meta).mean() > 0.9
    with pytest.raises(rewards.RewardError, match="names no digit"):
        r.score(images[:2], ["no digit here"] * 2)


def test_attributes_move_the_right_way(held_out):
    images = held_out[0][:64]
    ink, size, centered, sym = (rewards.load(n) for n in ["toy/ink", "toy/size", "toy/centered", "toy/symmetry"])
    bold = F.max_pool2d(images, 3, stride=1, padding=1)  # thicker strokes
    assert (ink.score(bold) > ink.score(images)).all()
    shifted = torch.roll(images, shifts=4, dims=-1) * (torch.arange(16) >= 4).float()  # move right
    assert centered.score(shifted).mean() < centered.score(images).mean() - 0.1
    small = F.pad(F.interpolate(images, size=8, mode="bilinear"), [4, 4, 4, 4])
    assert (size.score(small) < size.score(images)).float().mean() > 0.95
    mirrored = torch.cat([images[..., :8], images[..., :8].flip(-1)], dim=-1)
    assert torch.allclose(sym.score(mirrored), torch.ones(64)) and (sym.score(images) < 1).all()
    assert torch.allclose(rewards.load("toy/ink", target=0.2).score(images), -(ink.score(images) - 0.2).abs())


@pytest.mark.parametrize("name", ["toy/classifier", "toy/ink", "toy/size", "toy/centered", "toy/symmetry",
                                  "toy/clipscore"])
def test_differentiable_rewards_reach_the_pixels(held_out, name):
    reward = rewards.load(name)
    assert reward.differentiable
    x = held_out[0][:4].clone().requires_grad_(True)
    reward.score(x, ["a handwritten seven"] * 4).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_tiny_clip_ranks_the_matching_caption_first(held_out):
    """The Must-show bar: >= 80% of held-out real digits rank their own caption first."""
    images, labels = held_out
    clip = rewards.load("toy/clipscore", clamp=False)
    texts = clip.embed_texts([caption(d) for d in range(10)])
    with torch.no_grad():
        ranked = (clip.embed_images(images) @ texts.T).argmax(-1)
    assert (ranked == labels).float().mean() >= 0.8


def test_clipscore_loads_an_open_clip_folder_by_path(held_out):
    from flowalign.rewards.toy import WEIGHTS

    by_path = rewards.load("clipscore", model=str(WEIGHTS / "clip"))
    images, labels = held_out
    prompts = [caption(int(d)) for d in labels[:20]]
    assert torch.allclose(by_path.score(images[:20], prompts),
                          rewards.load("toy/clipscore").score(images[:20], prompts))
    with pytest.raises(rewards.RewardError, match="reward 'clipscore': cannot load"):
        rewards.load("clipscore", model="local-dir:/no/such/folder")


def test_composite_weights(held_out):
    images = held_out[0][:8]
    prompts = ["a handwritten one"] * 8
    combo = rewards.load_weighted({"toy/ink": 2.0, "toy/centered": -1.0})
    expect = 2 * rewards.load("toy/ink").score(images) - rewards.load("toy/centered").score(images)
    assert torch.allclose(combo.score(images, prompts), expect)


def test_batching_matches_one_pass(held_out):
    reward = rewards.load("toy/classifier")
    images, labels = held_out
    prompts = [caption(int(d)) for d in labels]
    full = reward.score(images, prompts)
    reward.batch_size = 7
    assert torch.allclose(reward.score(images, prompts), full, atol=1e-6)


def test_entry_point_plugin(tmp_path, monkeypatch):
    """A third-party package registers a reward through the `flowalign.rewards` entry-point group."""
    (tmp_path / "my_reward.py").write_text(textwrap.dedent("""
        import torch
        from flowalign.rewards import Reward

        class Brightness(Reward):
            differentiable = True
            def _score(self, media, prompts, metadata):
                return media.mean(dim=(1, 2, 3))
    """))
    dist = tmp_path / "my_reward-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-reward\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[flowalign.rewards]\nmy/brightness = my_reward:Brightness\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "my/brightness" in rewards.available()
    r = rewards.load("my/brightness")
    assert r.name == "my/brightness"
    assert torch.allclose(r.score(torch.full((2, 3, 4, 4), 0.25)), torch.full((2,), 0.25))


def test_toy_preference_judges_pairs_like_its_hidden_utility():
    from flowalign.rewards.toy import WEIGHTS
    from flowalign.rewards.toy.preference import PreferenceNet, ToyPreference
    from flowalign.toy.train_preference import pairwise_accuracy

    images, _ = load_digits("test")
    accuracy = pairwise_accuracy(PreferenceNet.from_pretrained(WEIGHTS / "preference"), images,
                                 torch.Generator().manual_seed(5))
    assert accuracy >= 0.85
    judge = rewards.load("toy/preference")
    assert isinstance(judge, ToyPreference) and judge.differentiable
    rgb = ((images[:8] + 1) / 2).expand(-1, 3, -1, -1)
    bold = F.max_pool2d(rgb, 3, stride=1, padding=1)
    assert (judge.prefer(bold, rgb) > 0.5).float().mean() >= 0.75
    wins = judge.score(torch.cat([rgb[:4], bold[:4]]), None, [{"group": 0}] * 8)
    assert wins[4:].mean() > wins[:4].mean()


def test_second_judge_reads_real_digits_and_is_a_different_model():
    """toy/judge_digit, the metric the learning tests check gains with, reads held-out real digits as well as a
    linear model can, and disagrees with nothing the CNN was trained on by construction: other inputs (8x8),
    other model (logistic regression)."""
    from flowalign.rewards.toy.judge import fitted_judge
    from flowalign.toy.data import load_digits

    images, labels = load_digits("test")
    media = ((images + 1) / 2).expand(-1, 3, -1, -1)
    judge = rewards.load("toy/judge_digit")
    assert not judge.differentiable and judge.score(media, [str(int(d)) for d in labels]).mean() > 0.9
    weight, bias = fitted_judge()
    assert weight.shape == (10, 64) and bias.shape == (10,)
