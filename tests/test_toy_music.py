"""The music toy world: the shipped melody model, the audio rewards, the spectral encoder and exemplar sets,
WAV export, and a few-step training run."""
import wave

import pytest
import torch

import flowalign
from flowalign import rewards
from flowalign.cli import main
from flowalign.generators.toy_music import SHIPPED, ToyMusicGenerator
from flowalign.rewards.errors import RewardError
from flowalign.rewards.toy.melody import LENGTH, SAMPLE_RATE, Melody, piano_roll, render
from flowalign.rewards.toy.music_exemplars import exemplar_set
from flowalign.toy.music_prompts import HELD_OUT_TEMPLATES, caption, sample_prompts

# Measured on the shipped weights (these 40 prompts, 20 steps, CFG 3, seed 0): pitch accuracy 0.997, key 0.962,
# exact tempo 0.90; on 200 prompts see README (`python -m flowalign.toy.music_flow`). The bars sit below.
PITCH_BAR, KEY_BAR, TEMPO_BAR = 0.9, 0.9, 0.75


@pytest.fixture(scope="module")
def gen():
    return flowalign.load_generator("toy/music", device="cpu")


@pytest.fixture(scope="module")
def judged(gen):
    """40 balanced prompts (every key x pattern x tempo), CFG 3, and the rewards of the samples."""
    prompts, _ = sample_prompts(40, seed=0)
    audio = flowalign.generate(gen, prompts, steps=20, guidance=3.0, seed=0)
    return prompts, audio


@pytest.fixture(scope="module")
def scorers():
    return {name: rewards.load(f"toy/{name}") for name in ("pitch_accuracy", "pitch", "key", "tempo")}


def test_shipped_model_loads_with_the_audio_interface(gen):
    assert isinstance(gen, ToyMusicGenerator) and gen.modality == "audio" and gen.sample_rate == SAMPLE_RATE
    assert gen.latent_shape == (24, 1, 32)
    x = gen.initial_noise(3, torch.Generator().manual_seed(0))
    audio = gen.decode(x)
    assert audio.shape == (3, 1, LENGTH) and audio.abs().max() <= 1
    weights = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert weights < 3e6


def test_generated_melodies_are_what_the_prompts_ask(gen, judged, scorers):
    prompts, audio = judged
    pitch = scorers["pitch_accuracy"].score(audio, prompts).mean()
    key = scorers["key"].score(audio, prompts).mean()
    tempo_exact = (scorers["tempo"].score(audio, prompts) == 0).float().mean()
    assert pitch >= PITCH_BAR and key >= KEY_BAR and tempo_exact >= TEMPO_BAR
    # A random latent decoded is far below: the rewards measure the model, not the renderer.
    noise_audio = gen.decode(gen.initial_noise(40, torch.Generator().manual_seed(1)))
    assert scorers["pitch_accuracy"].score(noise_audio, prompts).mean() < 0.2
    assert scorers["key"].score(noise_audio, prompts).mean() < key - 0.2


def test_prompts_steer_key_direction_and_tempo(gen, scorers):
    up_c, down_d = "a slow ascending C major scale", "a fast descending D major scale"
    audio = flowalign.generate(gen, [up_c] * 4 + [down_d] * 4, steps=20, seed=3)
    own = [up_c] * 4 + [down_d] * 4
    swapped = [down_d] * 4 + [up_c] * 4
    for name in ("pitch_accuracy", "key", "tempo"):
        assert scorers[name].score(audio, own).mean() > scorers[name].score(audio, swapped).mean() + 0.1, name


def test_held_out_phrasings(gen, scorers):
    melodies = [Melody("G major", "ascending scale", "slow"), Melody("A minor", "arpeggio", "fast"),
                Melody("F major", "descending scale", "fast"), Melody("D major", "repeated notes", "slow")]
    prompts = [caption(m, HELD_OUT_TEMPLATES[m.pattern][0]) for m in melodies]
    audio = flowalign.generate(gen, [p for p in prompts for _ in range(3)], steps=20, seed=0)
    assert scorers["pitch_accuracy"].score(audio, [p for p in prompts for _ in range(3)]).mean() >= 0.8


def test_rewards_rank_real_melodies(scorers):
    c_up = exemplar_set("ascending scales in C major", n=8)
    assert torch.equal(scorers["pitch_accuracy"].score(c_up, ["an ascending C major scale"] * 8), torch.ones(8))
    assert scorers["pitch_accuracy"].score(c_up, ["a descending C major scale"] * 8).max() < 0.3
    for right, wrong in [("C major", "D major"), ("G major", "F major"), ("A minor", "D major")]:
        real = exemplar_set(f"an arpeggio in {right}", n=6)
        assert (scorers["key"].score(real, [f"a {right} melody"] * 6)
                > scorers["key"].score(real, [f"a {wrong} melody"] * 6) + 0.1).all()
    fast, slow = exemplar_set("fast", n=6), exemplar_set("slow", n=6)
    assert (scorers["tempo"].score(fast, ["fast"] * 6) == 0).all()
    assert (scorers["tempo"].score(slow, ["slow"] * 6) == 0).all()
    assert (scorers["tempo"].score(fast, ["fast"] * 6) > scorers["tempo"].score(fast, ["slow"] * 6)).all()
    assert (scorers["tempo"].score(slow, ["slow"] * 6) > scorers["tempo"].score(slow, ["fast"] * 6)).all()
    silence = torch.zeros(2, 1, LENGTH)
    assert (scorers["key"].score(silence, ["C major"] * 2) == 0).all()
    assert (scorers["pitch"].score(silence, ["an ascending C major scale"] * 2) == 0).all()


def test_differentiable_rewards_reach_the_latent(gen, scorers):
    x = gen.initial_noise(2, torch.Generator().manual_seed(0)).requires_grad_(True)
    prompts = ["an ascending C major scale", "a fast arpeggio in A minor"]
    total = scorers["key"].score(gen.decode(x), prompts).sum() + scorers["pitch"].score(gen.decode(x), prompts).sum()
    total.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert scorers["key"].differentiable and scorers["pitch"].differentiable
    assert not scorers["pitch_accuracy"].differentiable and not scorers["tempo"].differentiable


def test_fad_vendi_and_exemplars_on_the_toy_encoder(gen, judged):
    prompts, audio = judged
    reference = exemplar_set("", n=64)
    fad = rewards.load("fd", encoder="toy/music_encoder", reference=reference)
    assert fad.modality == "audio" and fad.differentiable
    assert abs(fad.score_set(reference).item()) < 1e-4  # the set against itself
    noise = torch.rand(40, 1, LENGTH) * 2 - 1
    random_latents = gen.decode(gen.initial_noise(40, torch.Generator().manual_seed(2)))
    generated = fad.score_set(audio)
    assert generated > fad.score_set(noise) and generated > fad.score_set(random_latents)
    c_up = rewards.load("toy/music_fad", style="ascending scales in C major")
    assert c_up.score_set(exemplar_set("ascending scales in C major", n=32, seed=1)) > \
        c_up.score_set(exemplar_set("descending scales in D major", n=32, seed=1))
    exemplar = rewards.load("toy/music_exemplar", style="fast arpeggio in A minor")
    assert exemplar.score(exemplar_set("fast arpeggio in A minor", n=4, seed=5)).mean() > \
        exemplar.score(exemplar_set("slow descending scale in G major", n=4, seed=5)).mean()
    vendi = rewards.load("toy/music_vendi")
    same = render(piano_roll(Melody("C major", "arpeggio", "slow"))[None].expand(8, -1, -1))
    assert vendi.score_set(same) == pytest.approx(1.0, abs=1e-3) and vendi.score_set(reference[:8]) > 2


def test_bad_input_is_one_line(scorers):
    with pytest.raises(RewardError, match="names no key"):
        scorers["key"].score(torch.zeros(1, 1, LENGTH), ["a nice tune"])
    with pytest.raises(RewardError, match="toy/music_fad"):
        rewards.load("toy/music_fad", style="some jazz")
    with pytest.raises(RewardError, match="expected rolls"):
        render(torch.zeros(1, 12, 32))


def test_generate_writes_wav_files(tmp_path):
    out = tmp_path / "melody.wav"
    assert main(["generate", "--model", "toy/music", "--prompt", "an ascending C major scale", "--num", "2",
                 "--steps", "10", "--out", str(out)]) == 0
    for path in (tmp_path / "melody_000.wav", tmp_path / "melody_001.wav"):
        with wave.open(str(path)) as fh:
            header = (fh.getframerate(), fh.getnchannels(), fh.getsampwidth(), fh.getnframes())
            assert header == (SAMPLE_RATE, 1, 2, LENGTH)
            pcm = torch.frombuffer(bytearray(fh.readframes(fh.getnframes())), dtype=torch.int16)
        assert pcm.abs().max() > 3000  # not silent


def test_quick_training_writes_a_loadable_model(tmp_path):
    from flowalign.toy.music_flow import MusicFlowTrainConfig, train_music_flow

    train_music_flow(tmp_path / "music", MusicFlowTrainConfig(steps=3, batch_size=4), print_fn=lambda *_: None)
    gen = flowalign.load_generator(str(tmp_path / "music"), device="cpu")
    assert isinstance(gen, ToyMusicGenerator)
    audio = flowalign.generate(gen, ["a fast arpeggio in A minor"], steps=2)
    assert audio.shape == (1, 1, LENGTH) and torch.isfinite(audio).all()
