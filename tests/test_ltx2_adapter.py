"""LTX-2 (audio + video) adapter on a tiny random pipeline built offline: loading, the packed state, batch-first
conditioning, equality with ``LTX2Pipeline`` (grid, every guidance term, both decoders), rewards that score the
video, the audio or both, one GRPO iteration and the saved LoRA back in the plain pipeline."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import LTX2Pipeline
from tiny_ltx2 import build_tiny_ltx2

from flowalign.config import load_config
from flowalign.errors import FlowalignError
from flowalign.generators import load_generator
from flowalign.generators.ltx2 import LTX2Generator
from flowalign.rewards.base import InputSpec, Reward
from flowalign.rewards.errors import RewardError
from flowalign.rewards.media import AudioVideo, cat_media
from flowalign.training import make_trainer as build_trainer

PROMPTS = ["a photo of a cat", "a dog on the grass"]
#: 32x32, 5 frames at 25 fps: 3 x 16 x 16 video tokens and round(0.2 s x 16000 / 160 / 4) = 5 audio tokens of 4.
SIZE = {"height": 32, "width": 32, "num_frames": 5, "frame_rate": 25.0}
OPTIONS = {**SIZE, "max_sequence_length": 16, "stg_blocks": [1]}
TOKENS, AUDIO_TOKENS = 3 * 16 * 16, 5
LATENT = (TOKENS + AUDIO_TOKENS, 4)
#: No guidance of any kind (the pipeline's defaults turn STG, modality guidance and the rescale on).
PLAIN = {"stg_scale": 0.0, "audio_stg_scale": 0.0, "modality_scale": 1.0, "audio_modality_scale": 1.0,
         "guidance_rescale": 0.0, "audio_guidance_rescale": 0.0}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_tiny_ltx2(tmp_path_factory.mktemp("tiny_ltx2") / "pipe")


def load(folder: Path, **options) -> LTX2Generator:
    return load_generator(str(folder), local_files_only=True, device="cpu", **{**OPTIONS, **options})


def pipeline(folder: Path) -> LTX2Pipeline:
    pipe = LTX2Pipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(seed: int, n: int = 2) -> torch.Tensor:
    return torch.randn((n, *LATENT), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def euler(gen, x: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
    cond = gen.encode(PROMPTS, negative_prompt="" if guidance != 1.0 else None)
    sigmas, x = gen.sigmas(steps), x.clone()
    for i in range(steps):
        x = x + (sigmas[i + 1] - sigmas[i]) * gen.velocity(x, sigmas[i], cond, guidance)
    return x


# ---------------------------------------------------------------- loading, state and conditioning


def test_load_generator_picks_the_adapter_and_generates_audio_and_video(folder):
    import flowalign

    gen = load(folder)
    assert type(gen) is LTX2Generator and gen.trainable_module is gen.pipe.transformer
    assert (gen.latent_shape, gen.default_steps, gen.default_guidance) == (LATENT, 30, 3.0)
    assert gen.modality == "audio_video" and gen.sample_rate == 16000
    media = flowalign.generate(gen, PROMPTS, steps=2, guidance=1.0)
    assert isinstance(media, AudioVideo) and len(media) == 2 and media.sample_rate == 16000
    assert media.video.shape == (2, 5, 3, 32, 32) and 0 <= media.video.min() and media.video.max() <= 1
    assert media.audio.shape[:2] == (2, 2) and media.audio.abs().max() <= 1
    joined = cat_media([media[0], media[1]])
    torch.testing.assert_close(joined.video, media.video) and torch.testing.assert_close(joined.audio, media.audio)


@torch.no_grad()
def test_conditioning_is_batch_first_and_each_stream_feels_the_other(folder):
    """Connector outputs are batch-first (one selected row predicts what it does in the batch); the audio tokens
    change the video's velocity (the streams attend to each other), and the split is where the packing puts it."""
    gen = load(folder)
    cond = gen.encode(PROMPTS)
    assert cond.positive["video_embeds"].shape[:2] == (2, 16) and cond.positive["attention_mask"].shape == (2, 16)
    x, sigma = noise(1), torch.tensor([0.9, 0.4])
    both = gen.predict(x, sigma, cond.positive)
    torch.testing.assert_close(gen.predict(x[1:], sigma[1:], cond.select([1]).positive), both[1:],
                               rtol=1e-5, atol=1e-5)
    other = x.clone()
    other[:, TOKENS:] += 1.0  # only the audio tokens change
    moved = gen.predict(other, sigma, cond.positive)
    assert not torch.allclose(moved[:, :TOKENS], both[:, :TOKENS])


def test_grid_is_the_pipelines_shifted_linspace(folder):
    """linspace(1, 1/4, 4) = [1, .75, .5, .25] through the scheduler's static shift 1, then 0."""
    torch.testing.assert_close(load(folder).sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


# ---------------------------------------------------------------- equality with the pipeline


@pytest.mark.parametrize("guidance, options", [
    (1.0, {}),  # one conditional pass: the pipeline with every scale at its neutral value
    (3.0, PLAIN),  # CFG only, video 3 and the pipeline's audio 7
    (3.0, {}),  # the pipeline's defaults: CFG, STG, modality isolation and the rescale on both streams
], ids=["no_guidance", "cfg", "all_terms"])
def test_euler_matches_the_pipeline(folder, guidance, options):
    """Euler through the adapter equals the pipeline's own sampling from the same packed latents, both streams
    within 1e-5 (fp32), and its decoders equal the pipeline's video and audio (the tiny VAEs' latent statistics
    are not the identity, so the denormalisation is checked)."""
    pipe = pipeline(folder)
    gen = LTX2Generator(pipe, **{**OPTIONS, **options})
    start = noise(3)
    ours = euler(gen, start, 2, guidance)
    scales = {**PLAIN, "guidance_scale": 1.0, "audio_guidance_scale": 1.0} if guidance == 1.0 else \
        {"audio_guidance_scale": 7.0, "stg_scale": 1.0, "audio_stg_scale": 1.0, "modality_scale": 3.0,
         "audio_modality_scale": 3.0, "guidance_rescale": 0.7, "audio_guidance_rescale": 0.7, **options,
         "guidance_scale": guidance}
    # packed latents go in as they are; packed audio latents are normalised, so give them pre-normalisation
    video, audio = start[:, :TOKENS], start[:, TOKENS:]
    vae = pipe.audio_vae
    run = {"num_inference_steps": 2, "max_sequence_length": 16, "spatio_temporal_guidance_blocks": [1],
           "latents": video.clone(), "audio_latents": audio * vae.latents_std + vae.latents_mean, **SIZE, **scales}
    latents = pipe(PROMPTS, output_type="latent", **run)
    media = gen.decode(ours)
    reference = pipe._pack_latents(pipe._normalize_latents(latents.frames, pipe.vae.latents_mean,
                                                           pipe.vae.latents_std, pipe.vae.config.scaling_factor))
    torch.testing.assert_close(ours[:, :TOKENS], reference, rtol=1e-5, atol=1e-5)
    reference_audio = pipe._normalize_audio_latents(pipe._pack_audio_latents(latents.audio), vae.latents_mean,
                                                    vae.latents_std)
    torch.testing.assert_close(ours[:, TOKENS:], reference_audio, rtol=1e-5, atol=1e-5)
    if guidance == 1.0:  # and both decoders, once
        out = pipe(PROMPTS, output_type="pt", **run)
        torch.testing.assert_close(media.video, out.frames, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(media.audio, out.audio.float().clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_bad_options_are_one_line_errors(folder):
    with pytest.raises(FlowalignError, match="multiples of 2"):
        load(folder, height=33)
    with pytest.raises(FlowalignError, match="num_frames - 1 must be a multiple of 2"):
        load(folder, num_frames=4)
    with pytest.raises(FlowalignError, match="frame_rate and motion_speed must be > 0"):
        load(folder, frame_rate=0)
    with pytest.raises(FlowalignError, match="unknown option 'fps'.*LTX2Generator"):
        load(folder, fps=24)


# ---------------------------------------------------------------- rewards on joint media


class Loudness(Reward):
    name, modality, differentiable = "loudness", "audio", True
    input_spec = InputSpec((-1.0, 1.0), "BCL")

    def _score(self, media, prompts, metadata):
        return media.abs().mean(dim=(1, 2))


class Brightness(Reward):
    name, modality, differentiable = "brightness", "video", True

    def _score(self, media, prompts, metadata):
        return media.mean(dim=(1, 2, 3, 4))


class Together(Reward):
    """Scores both parts at once: what an audio-visual reward (sync, an AV judge) receives."""
    name, modality = "together", "audio_video"

    def _score(self, media, prompts, metadata):
        return media.video.mean(dim=(1, 2, 3, 4)) + media.audio.abs().mean(dim=(1, 2))


def test_rewards_score_the_video_the_audio_or_both():
    media = AudioVideo(torch.rand(3, 2, 3, 4, 4), torch.rand(3, 2, 50) * 2 - 1, 16000)
    bright, loud = media.video.mean(dim=(1, 2, 3, 4)), media.audio.abs().mean(dim=(1, 2))
    torch.testing.assert_close(Brightness().score(media), bright)
    torch.testing.assert_close(Loudness().score(media), loud)
    torch.testing.assert_close(Together().score(media), bright + loud)
    with pytest.raises(RewardError, match="reward together: expected audio\\+video media"):
        Together().score(media.video)

    class Sharpness(Reward):
        name = "sharpness"

        def _score(self, media, prompts, metadata):
            return media.mean(dim=(1, 2, 3))

    with pytest.raises(RewardError, match="reward sharpness: a image reward cannot score audio\\+video media"):
        Sharpness().score(media)


def test_reports_and_files_show_the_clips_and_keep_the_soundtracks(tmp_path):
    """The report draws the clips and writes the soundtracks at the media's own rate; the animation writer and the
    monitor's diversity read the clips."""
    import wave

    from flowalign.inference import save_video
    from flowalign.training.monitor import per_prompt_diversity
    from flowalign.training.report import write_report

    media = AudioVideo(torch.rand(4, 3, 3, 8, 8), torch.rand(4, 2, 40) * 2 - 1, 24000)
    scores = torch.rand(4)
    write_report(tmp_path, (media, scores), (media, scores), [{"iteration": 0, "reward/mean": 0.5}], {})
    report = tmp_path / "report"
    assert (report / "before.png").is_file() and (report / "after.png").is_file()
    wavs = sorted(report.glob("after_*.wav"))
    assert len(wavs) == 4
    with wave.open(str(wavs[0])) as fh:
        assert (fh.getframerate(), fh.getnchannels(), fh.getnframes()) == (24000, 2, 40)
    assert save_video(media, tmp_path / "clips.gif").is_file()
    assert per_prompt_diversity(media, 2) == per_prompt_diversity(media.video, 2)


# ---------------------------------------------------------------- GRPO end to end


def make_trainer(folder: Path, work: Path, *overrides: str):
    prompt_file = work / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS + ["an astronaut riding a horse"]) + "\n")
    cfg = load_config("configs/ltx2/flow_grpo.yaml", [
        f"model.name={folder}", "model.local_files_only=true", "model.dtype=float32", f"model.options={OPTIONS}",
        "reward.weights={video/temporal: 1.0, audio/loudness: 0.01}", "reward.options={}",
        f"train.prompt_file={prompt_file}", "train.iterations=1", "train.prompts_per_iteration=2",
        "flow_grpo.group_size=2", "train.steps=3", "train.eval_steps=3", "train.guidance=3.0",
        "train.eval_prompts=0", "train.rollout_batch=4", "train.train_batch=4", "train.updates_per_iteration=1",
        "train.lr=1e-2", "flow_grpo.clip_range=0.2", "train.lora_rank=4", "train.lora_alpha=8",
        "train.mixed_precision=no", "train.gradient_checkpointing=false", "train.cache_prompts=false",
        "train.text_encoders=device", "train.checkpoint_every=0", f"output_dir={work / 'run'}", *overrides])
    return build_trainer(cfg)


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """One GRPO iteration (LTX-2's guidance at CFG 3, SDE rollouts over both streams, a video reward plus an audio
    reward); the trainer and its saved LoRA folder."""
    trainer = make_trainer(folder, tmp_path_factory.mktemp("grpo_ltx2"))
    history = trainer.fit(progress=False)
    assert len(history) == 1 and history[0]["reward/std"] > 0  # distinct rewards: non-zero advantages
    assert {"reward/video/temporal", "reward/audio/loudness"} <= set(history[0])  # each part logged
    final = trainer.save_final()
    trainer.acc.end_training()
    return trainer, final


def test_final_lora_loads_into_the_pipeline_as_the_trained_policy(trained, folder):
    """``LTX2Pipeline.load_lora_weights`` reads the saved LoRA, changes the pipeline's samples, and an adapter on that
    pipeline computes the trained policy's velocity on both streams."""
    trainer, final = trained
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    pipe = pipeline(folder)
    run = {"num_inference_steps": 2, "max_sequence_length": 16, "guidance_scale": 1.0, "audio_guidance_scale": 1.0,
           "stg_scale": 0.0, "audio_stg_scale": 0.0, "modality_scale": 1.0, "audio_modality_scale": 1.0,
           "latents": noise(0, 1)[:, :TOKENS], "output_type": "pt", **SIZE}
    base = pipe(PROMPTS[:1], **run).frames
    pipe.load_lora_weights(final)
    tuned = pipe(PROMPTS[:1], **run).frames
    assert torch.isfinite(tuned).all() and not torch.allclose(base, tuned)
    loaded, gen = LTX2Generator(pipe, **OPTIONS), trainer.gen
    cond = gen.encode(PROMPTS, negative_prompt=None)
    x, sigma = noise(1), gen.sigmas(4)[[0, 2]]
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(x, sigma, cond.positive), gen.predict(x, sigma, cond.positive),
                                   rtol=1e-5, atol=1e-5)


def test_bf16_iteration_with_cached_offloaded_prompts_keeps_fp32_log_probs(folder, tmp_path):
    """bf16 weights with the shipped config's prompt cache and offloaded text encoder: the iteration over both
    streams is finite and the rollout log-probs stay float32."""
    trainer = make_trainer(folder, tmp_path, "model.dtype=bfloat16", "train.cache_prompts=true",
                           "train.text_encoders=offload")
    assert trainer.gen.dtype == torch.bfloat16
    history = trainer.fit(progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in history[0].values())
    rollout = trainer.rollout(1).rollout
    assert rollout.logp.dtype == torch.float32 and torch.isfinite(rollout.logp).all()
    trainer.acc.end_training()
