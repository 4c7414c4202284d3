"""The Z-Image adapter on a tiny random ZImagePipeline built offline: loading, the variable-length captions carried
batch-first, equality with the diffusers pipeline (sign, 1 - σ timesteps, CFG with its options, grid, decoder), one
GRPO iteration and the saved LoRA back in diffusers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
from tiny_z_image import build_tiny_z_image

from flowalign.config import load_config
from flowalign.errors import FlowalignError
from flowalign.generators import load_generator
from flowalign.generators.z_image import ZImageGenerator
from flowalign.training import make_trainer as build_trainer
from flowalign.training.trainer import Trainer

PROMPTS = ["a photo of a cat", "a red apple"]  # captions of different lengths (14 and 13 tokens)
OPTIONS = {"height": 16, "width": 16, "max_sequence_length": 32}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_tiny_z_image(tmp_path_factory.mktemp("tiny_z_image") / "pipe")


def load(folder: Path, **options) -> ZImageGenerator:
    return load_generator(str(folder), local_files_only=True, device="cpu", **{**OPTIONS, **options})


def pipeline(folder: Path) -> ZImagePipeline:
    pipe = ZImagePipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded_noise(gen, seed: int = 0, n: int = len(PROMPTS)) -> torch.Tensor:
    return gen.initial_noise(n, torch.Generator().manual_seed(seed))


@torch.no_grad()
def euler(gen, noise: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
    """Zero-noise sampling in flow coordinates: Euler over ``gen.sigmas``; returns the final latents."""
    cond = gen.encode(PROMPTS, negative_prompt="" if guidance != 1.0 else None)
    sigmas, x = gen.sigmas(steps), noise.clone()
    for i in range(steps):
        x = x + (sigmas[i + 1] - sigmas[i]) * gen.velocity(x, sigmas[i], cond, guidance)
    return x


# ---------------------------------------------------------------- loading and conditioning


def test_load_generator_picks_the_adapter(folder):
    import flowalign

    gen = load(folder)
    assert type(gen) is ZImageGenerator and gen.trainable_module is gen.pipe.transformer
    assert gen.lora_format == ("ZImagePipeline", "transformer") and gen.latent_shape == (4, 16, 16)
    media = flowalign.generate(gen, PROMPTS, steps=2, guidance=1.0)
    assert media.shape == (2, 3, 16, 16) and media.dtype == torch.float32 and 0 <= media.min() <= media.max() <= 1


@torch.no_grad()
def test_captions_are_the_pipelines_padded_with_a_mask(folder):
    """Each row holds the pipeline's caption (Qwen3's second-to-last layer over the chat template's real tokens),
    zeros after it, and the mask marks exactly those tokens; the caller's list is not rewritten."""
    gen = load(folder)
    prompts = list(PROMPTS)
    cond = gen.encode(prompts, negative_prompt="")
    assert prompts == PROMPTS
    theirs, theirs_negative = gen.pipe.encode_prompt(list(PROMPTS), negative_prompt=["", ""], max_sequence_length=32)
    for branch, captions in ((cond.positive, theirs), (cond.negative, theirs_negative)):
        assert branch["prompt_embeds"].shape == (2, 32, 16) and branch["prompt_mask"].dtype == torch.bool
        for row, caption in enumerate(captions):
            length = len(caption)
            assert branch["prompt_mask"][row].tolist() == [True] * length + [False] * (32 - length)
            torch.testing.assert_close(branch["prompt_embeds"][row, :length], caption, rtol=0, atol=0)
            assert not branch["prompt_embeds"][row, length:].any()
    assert len(theirs[0]) != len(theirs[1])  # the two prompts really have different lengths


@torch.no_grad()
def test_a_batch_predicts_as_its_rows_alone(folder):
    """Variable-length captions in one pass give each sample what it gets alone; select / repeat_interleave keep
    the masks aligned with their embeddings."""
    gen = load(folder)
    cond = gen.encode(PROMPTS, negative_prompt=None).repeat_interleave(2)
    x, sigma = seeded_noise(gen, 1, n=4), torch.tensor([0.9, 0.7, 0.5, 0.3])
    batch = gen.predict(x, sigma, cond.positive)
    for row in range(4):
        alone = gen.predict(x[row:row + 1], sigma[row:row + 1], cond.select([row]).positive)
        torch.testing.assert_close(batch[row:row + 1], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batch[0], gen.predict(x[:1], sigma[:1], cond.select([2]).positive)[0])


def test_bad_options_are_one_line_errors(folder):
    for options, message in (({"height": 15}, "multiples of 2"), ({"cfg_truncation": 1.5}, "cfg_truncation"),
                             ({"cfg_normalization": -1.0}, "cfg_normalization"),
                             ({"max_sequence_length": 4096}, "max_sequence_length"),
                             ({"guidance_scale": 4.0}, "unknown option 'guidance_scale'.*ZImageGenerator")):
        with pytest.raises(FlowalignError, match=message) as err:
            load(folder, **options)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- equality with diffusers

#: (adapter guidance w, cfg_normalization, cfg_truncation); the pipeline's guidance_scale is w - 1.
CASES = [(1.0, 0.0, 1.0), (3.0, 0.0, 1.0), (3.0, 1.0, 0.2)]


@pytest.mark.parametrize("guidance, normalization, truncation", CASES)
def test_euler_matches_the_pipeline(folder, guidance, normalization, truncation):
    """The pipeline's latents and images for the same initial noise (tolerance 1e-5 in fp32): the negated output,
    the 1 - σ timestep, its CFG ``pos + g·(pos - neg)`` (g = w - 1), the norm cap and truncation (with 4 steps on
    the shift-3 grid 1 - σ is 0, .1, .25, .5: truncation 0.2 leaves the last two steps unguided)."""
    gen = load(folder, cfg_normalization=normalization, cfg_truncation=truncation)
    noise = seeded_noise(gen, 3)
    ours = euler(gen, noise, 4, guidance)
    call = dict(height=16, width=16, num_inference_steps=4, guidance_scale=guidance - 1.0, max_sequence_length=32,
                cfg_normalization=normalization, cfg_truncation=truncation)
    theirs = gen.pipe(list(PROMPTS), latents=noise.clone(), output_type="latent", **call).images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    images = gen.pipe(list(PROMPTS), latents=noise.clone(), output_type="pt", **call).images
    torch.testing.assert_close(gen.decode(ours), images, rtol=1e-5, atol=1e-5)
    if normalization:  # the options changed the samples: the comparison exercised them
        assert not torch.allclose(ours, euler(load(folder), noise, 4, guidance), atol=1e-4)


@torch.no_grad()
def test_truncation_per_sample_when_sigmas_differ(folder):
    """A batch at two noise levels: the sample past the truncation gets its conditional velocity only."""
    gen = load(folder, cfg_truncation=0.2)
    cond = gen.encode(PROMPTS)
    x, sigma = seeded_noise(gen, 2), torch.tensor([0.9, 0.5])  # 1 - σ = 0.1 (guided), 0.5 (not)
    mixed = gen.velocity(x, sigma, cond, 3.0)
    torch.testing.assert_close(mixed[:1], gen.velocity(x[:1], sigma[:1], cond.select([0]), 3.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1:], gen.predict(x[1:], sigma[1:], cond.select([1]).positive),
                               rtol=1e-5, atol=1e-5)


def test_time_grid_is_the_pipelines(folder):
    """Static shift 3 over linspace(1, 1/4, 4), by hand 3s/(1+2s) = [1, .9, .75, .5], then 0; a dynamic-shift
    scheduler config gives the sigmas the pipeline visits for its image token count."""
    gen = load(folder)
    assert torch.allclose(gen.sigmas(4), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    pipe = pipeline(folder)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                     max_image_seq_len=256, base_shift=0.5, max_shift=1.15)
    dynamic = ZImageGenerator(pipe, **OPTIONS)
    pipe(PROMPTS[:1], height=16, width=16, num_inference_steps=3, guidance_scale=0.0, max_sequence_length=32,
         output_type="latent")
    torch.testing.assert_close(dynamic.sigmas(3), pipe.scheduler.sigmas.float())
    assert not torch.allclose(dynamic.sigmas(3), gen.sigmas(3))


# ---------------------------------------------------------------- GRPO end to end


def make_trainer(folder: Path, work: Path, *overrides: str) -> Trainer:
    prompt_file = work / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS + ["a dog on the grass"]) + "\n")
    cfg = load_config(None, [
        f"model.name={folder}", "model.local_files_only=true", f"model.options={OPTIONS}",
        "reward.weights={toy/ink: 1.0}", f"train.prompt_file={prompt_file}", "train.iterations=1",
        "train.prompts_per_iteration=2", "flow_grpo.group_size=2", "train.steps=3", "train.guidance=3.0",
        "train.eval_prompts=0", "train.rollout_batch=4", "train.train_batch=4", "train.updates_per_iteration=1",
        "train.lr=1e-2", "flow_grpo.clip_range=0.2", "train.lora_rank=4", "train.lora_alpha=8",
        "train.checkpoint_every=0", f"output_dir={work / 'run'}", *overrides])
    return build_trainer(cfg)


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """One GRPO iteration with CFG (guidance 3); the trainer and its saved ``final/`` LoRA."""
    trainer = make_trainer(folder, tmp_path_factory.mktemp("grpo_z_image"))
    history = trainer.fit(progress=False)
    assert len(history) == 1 and history[0]["reward/std"] > 0  # distinct rewards: non-zero advantages
    final = trainer.save_final()
    trainer.acc.end_training()
    return trainer, final


@torch.no_grad()
def sample(pipe: ZImagePipeline) -> torch.Tensor:
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    return pipe(PROMPTS[:1], height=16, width=16, num_inference_steps=3, guidance_scale=2.0, latents=latents,
                max_sequence_length=32, output_type="pt").images


def test_final_lora_loads_into_the_pipeline_as_the_trained_policy(trained, folder):
    """The saved LoRA loads with ZImagePipeline.load_lora_weights, changes its samples, and computes the trained
    policy exactly."""
    trainer, final = trained
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    pipe = pipeline(folder)
    base = sample(pipe)
    pipe.load_lora_weights(final)
    tuned = sample(pipe)
    assert torch.isfinite(tuned).all() and not torch.allclose(base, tuned)
    gen, loaded = trainer.gen, ZImageGenerator(pipe, **OPTIONS)
    cond = gen.encode(PROMPTS, negative_prompt=None)
    x, sigma = seeded_noise(gen, 1), gen.sigmas(4)[[0, 2]]
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(x, sigma, cond.positive), gen.predict(x, sigma, cond.positive),
                                   rtol=1e-5, atol=1e-5)


def test_bf16_iteration_keeps_fp32_log_probs(folder, tmp_path):
    """bf16 weights with activation checkpointing (the real config's): finite losses, fp32 log-probs."""
    trainer = make_trainer(folder, tmp_path, "model.dtype=bfloat16", "train.gradient_checkpointing=true")
    assert trainer.gen.dtype == torch.bfloat16
    history = trainer.fit(progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in history[0].values())
    rollout = trainer.rollout(1).rollout
    assert rollout.logp.dtype == torch.float32 and torch.isfinite(rollout.logp).all()
    trainer.acc.end_training()
