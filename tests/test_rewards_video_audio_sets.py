"""Video, audio and set rewards: frame aggregation and temporal consistency on toy videos, CLAP on a tiny
ClapModel saved and loaded back, and the closed forms behind Fréchet, Vendi and exemplar rewards."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from flowalign import rewards
from flowalign.rewards.distributional import frechet_distance, gaussian_stats, vendi_score
from flowalign.rewards.video import attenuation_weights, segment_bounds
from flowalign.toy.data import load_digits
from flowalign.toy.prompts import caption


@pytest.fixture(scope="module")
def held_out():
    images, labels = load_digits("test")
    return ((images + 1) / 2).expand(-1, 3, -1, -1), labels  # RGB in [0,1], as generators decode


@pytest.fixture(scope="module")
def clip():
    return rewards.load("toy/clipscore")


# ---- video ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["tsn", "uniform"])
def test_frames_of_a_static_video_score_as_the_image(held_out, sampler):
    images, labels = held_out[0][:6], held_out[1][:6]
    prompts = [caption(int(d)) for d in labels]
    video = images[:, None].expand(-1, 8, -1, -1, -1)
    reward = rewards.load("video/frames", sampler=sampler)
    assert reward.modality == "video" and reward.differentiable
    image_scores = rewards.load("toy/classifier").score(images, prompts)
    assert torch.allclose(reward.score(video, prompts), image_scores, atol=1e-6)
    x = video.clone().requires_grad_(True)
    reward.score(x, prompts).sum().backward()
    assert x.grad.abs().sum() > 0


def test_attenuation_weights_the_middle_frames():
    assert segment_bounds(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)] and len(segment_bounds(3, 4)) == 3
    values = torch.tensor([(f / 8) ** 2 for f in range(8)])
    video = values.view(1, 8, 1, 1, 1).expand(1, 8, 3, 4, 4).contiguous()
    reward = rewards.load("video/frames", image_reward="toy/ink", sampler="uniform", tar_lambda=1.0)
    idx = reward.frame_indices(8)
    assert idx == [1, 3, 5, 7]
    w = torch.tensor([math.exp(-abs(i - 4)) for i in idx])
    assert torch.allclose(attenuation_weights(idx, 8, 1.0), w)
    assert torch.allclose(reward.score(video), (w * values[idx]).sum()[None] / w.sum())
    flat = rewards.load("video/frames", image_reward="toy/ink", sampler="uniform", tar_lambda=0.0)
    assert torch.allclose(flat.score(video), values[idx].mean()[None])


def test_tsn_is_seeded_and_stays_in_its_segments():
    a = rewards.load("video/frames", image_reward="toy/ink", seed=3)
    b = rewards.load("video/frames", image_reward="toy/ink", seed=3)
    c = rewards.load("video/frames", image_reward="toy/ink", seed=4)
    seq_a, seq_b, seq_c = ([r.frame_indices(16) for _ in range(10)] for r in (a, b, c))
    assert seq_a == seq_b and seq_a != seq_c
    assert len({tuple(s) for s in seq_a}) > 1  # a fresh draw per call
    assert all(4 * k <= i < 4 * (k + 1) for s in seq_a for k, i in enumerate(s))


def test_temporal_consistency(held_out, clip):
    digit = held_out[0][:2]
    static = digit[:, None].expand(-1, 6, -1, -1, -1)
    moving = torch.stack([torch.roll(digit, shifts=k // 2, dims=-1) for k in range(8)], dim=1)  # slow drift
    shuffled = moving[:, [0, 7, 1, 6, 2, 5, 3, 4]]
    pixels = rewards.load("video/temporal")
    assert torch.allclose(pixels.score(static), torch.ones(2), atol=1e-5)
    assert (pixels.score(shuffled) < pixels.score(moving)).all()
    x = moving.clone().requires_grad_(True)
    pixels.score(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    embedded = rewards.load("video/temporal", encoder=clip)
    assert torch.allclose(embedded.score(static), torch.ones(2), atol=1e-4)
    assert (embedded.score(shuffled) < embedded.score(moving) + 1e-6).all()


# ---- CLAP ----------------------------------------------------------------------------------------------

def _byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (the byte-level BPE alphabet)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [table[b] for b in range(256)]


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory):
    """A tiny ClapModel (AudioLDM2's test sizes), its feature extractor and a byte-level RoBERTa tokenizer,
    saved with save_pretrained. ``patch_stride=2`` keeps the second Swin stage at 2x2, which window_size 2 needs
    (at the default stride 4 the second stage is 1x1 and transformers 5 fails on the window's position bias)."""
    from transformers import (
        ClapAudioConfig,
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapProcessor,
        ClapTextConfig,
        RobertaTokenizer,
    )

    path = tmp_path_factory.mktemp("tiny_clap")
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *_byte_chars(), "<mask>"])}
    tokenizer = RobertaTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text = ClapTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=8, intermediate_size=37,
                          num_attention_heads=1, num_hidden_layers=1, vocab_size=len(vocab), projection_dim=16)
    audio = ClapAudioConfig(spec_size=8, window_size=2, patch_stride=[2, 2], num_mel_bins=8, intermediate_size=37,
                            depths=[1, 1], num_attention_heads=[1, 1], num_hidden_layers=1, hidden_size=192,
                            projection_dim=16)
    torch.manual_seed(0)
    model = ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=16)).eval()
    extractor = ClapFeatureExtractor(feature_size=8, hop_length=7900, max_length_s=1)
    model.save_pretrained(path)
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(path)
    return path, model


def test_clap_loads_back_and_scores(tiny_clap):
    path, model = tiny_clap
    reward = rewards.load("clap", path=str(path), local_files_only=True)
    assert reward.name == "clap" and reward.modality == "audio" and reward.differentiable
    assert set(reward.model.state_dict()) == set(model.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reward.model.state_dict().items())
    torch.manual_seed(1)
    audio = (torch.rand(3, 2, 48000) * 2 - 1).requires_grad_(True)
    scores = reward.score(audio, ["a dog barks", "rain", "a piano"])
    assert scores.shape == (3,) and (scores.abs() <= 1 + 1e-5).all()
    scores.sum().backward()
    assert torch.isfinite(audio.grad).all() and audio.grad.abs().sum() > 0
    short = reward.score(torch.rand(2, 1, 9000) * 2 - 1, ["a", "b"])  # repeat-padded to one second
    assert short.shape == (2,)


def test_clap_resamples_and_scores_against_a_reference(tiny_clap):
    path, _ = tiny_clap
    torch.manual_seed(2)
    clip = torch.rand(1, 16000) * 2 - 1  # one second at 16 kHz
    reward = rewards.load("clap", path=str(path), local_files_only=True, reference_audio=clip, sample_rate=16000)
    other = torch.rand(1, 1, 16000) * 2 - 1
    s = reward.score(torch.stack([clip, other[0]]))
    assert torch.allclose(s[0], torch.tensor(1.0), atol=1e-5) and s[1] < 1


@pytest.mark.parametrize("truncation", ["fusion", "rand_trunc"])  # HTK and Slaney mel filter banks
def test_clap_log_mel_matches_the_numpy_extractor(tiny_clap, truncation):
    from transformers import ClapFeatureExtractor

    from flowalign.rewards.clap import ClapLogMel

    extractor = ClapFeatureExtractor.from_pretrained(tiny_clap[0], truncation=truncation)
    torch.manual_seed(3)
    wave = (torch.rand(2, extractor.nb_max_samples) * 2 - 1) * torch.linspace(0, 1, extractor.nb_max_samples)
    expect = extractor(list(wave.double().numpy()), sampling_rate=extractor.sampling_rate,
                       return_tensors="pt")["input_features"][:, 0]
    ours = ClapLogMel(extractor)(wave)
    assert ours.shape == expect.shape
    assert torch.allclose(ours, expect.float(), atol=1e-3)


# ---- closed forms --------------------------------------------------------------------------------------

def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 6)), rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6)) + 1.0
    mu1, c1 = gaussian_stats(torch.tensor(a))
    mu2, c2 = gaussian_stats(torch.tensor(b))
    assert np.allclose(c1.numpy(), np.cov(a, rowvar=False))
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(np.cov(a, rowvar=False) + np.cov(b, rowvar=False)) \
        - 2 * np.trace(scipy.linalg.sqrtm(np.cov(a, rowvar=False) @ np.cov(b, rowvar=False))).real
    assert abs(frechet_distance(mu1, c1, mu2, c2).item() - ref) < 1e-8 * max(1.0, ref)
    assert abs(frechet_distance(mu1, c1, mu1, c1).item()) < 1e-9
    low_rank = torch.tensor(rng.normal(size=(4, 6)))  # 4 items in 6 dims: a singular covariance
    assert abs(frechet_distance(*gaussian_stats(low_rank), *gaussian_stats(low_rank)).item()) < 1e-9


def test_vendi_closed_forms():
    same = torch.randn(1, 5).expand(7, 5)
    assert torch.allclose(vendi_score(same), torch.tensor(1.0, dtype=torch.float64))
    for q in [1.0, 0.5, 2.0, float("inf")]:
        assert torch.allclose(vendi_score(torch.eye(6), q), torch.tensor(6.0, dtype=torch.float64))
    mixed = torch.cat([torch.eye(3), torch.eye(3)[:1]])  # 4 items, 3 distinct
    assert 1 < vendi_score(mixed) < 3


def test_frechet_reward_prefers_real_digits(held_out, clip):
    images = held_out[0]
    reference, real = images[:200], images[200:264]
    noise = torch.rand_like(real)
    fd = rewards.load("fd", encoder=clip, reference=reference)
    assert torch.allclose(fd.score_set(reference), torch.tensor(0.0), atol=1e-6)
    from_embeddings = rewards.load("fd", encoder=clip, reference=clip.embed_images(reference).detach())
    assert torch.allclose(from_embeddings.score(real), fd.score(real), rtol=1e-4)
    assert fd.score_set(real) > fd.score_set(noise)
    assert (fd.score(real) <= 1e-9).all() and fd.score(real).mean() > fd.score(noise).mean()
    x = real[:4].clone().requires_grad_(True)
    fd.score(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(rewards.RewardError, match="reward 'fd': cannot load"):
        rewards.load("fd", encoder=clip)


def test_set_reward_reference_from_a_safetensors_file(held_out, clip, tmp_path):
    """Configs name a reference set by path: a safetensors file whose 'reference' holds media or embeddings."""
    from safetensors.torch import save_file

    reference, real = held_out[0][:200], held_out[0][200:232]
    save_file({"reference": clip.embed_images(reference).detach().contiguous()}, tmp_path / "ref.safetensors")
    from_file = rewards.load("fd", encoder=clip, reference=str(tmp_path / "ref.safetensors"))
    assert torch.allclose(from_file.score(real), rewards.load("fd", encoder=clip, reference=reference).score(real),
                          rtol=1e-4)
    save_file({"other": reference.contiguous()}, tmp_path / "bad.safetensors")
    with pytest.raises(rewards.RewardError, match="no tensor named 'reference'"):
        rewards.load("fd", encoder=clip, reference=str(tmp_path / "bad.safetensors"))
    with pytest.raises(rewards.RewardError, match="not found"):
        rewards.load("fd", encoder=clip, reference=str(tmp_path / "missing.safetensors"))


def test_vendi_reward_rewards_diversity(held_out, clip):
    images, labels = held_out
    vendi = rewards.load("vendi", encoder=clip)
    same = images[:1].expand(8, -1, -1, -1)
    assert torch.allclose(vendi.score_set(same), torch.tensor(1.0), atol=1e-4)
    diverse = torch.stack([images[(labels == d).nonzero()[0, 0]] for d in range(8)])
    assert vendi.score_set(diverse) > 1.5
    batch = torch.cat([diverse[:6], diverse[:1]])  # digit 0 twice
    contrib = vendi.score(batch)
    assert contrib.shape == (7,) and contrib[[0, 6]].max() < contrib[1:6].min()


def test_exemplar_reward_with_text_and_image_exemplars(held_out, clip):
    images, labels = held_out
    sevens = rewards.load("exemplar", encoder=clip, exemplars=[caption(7), caption(7, "the digit {d}")])
    s = sevens.score(images)
    assert s[labels == 7].mean() > s[labels != 7].mean() + 0.05
    three = images[labels == 3]
    threes = rewards.load("exemplar", encoder=clip, exemplars=three[:10], reduce="max")
    s = threes.score(images[100:])
    lab = labels[100:]
    assert s[lab == 3].mean() > s[lab != 3].mean()
