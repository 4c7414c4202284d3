"""The Qwen-Image adapter on a tiny random QwenImagePipeline built offline: loading, the seeded noise, the time grid,
equality with the pipeline (plain and true CFG with norm rescaling), one GRPO iteration with true CFG, and the saved
LoRA back in diffusers."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import QwenImagePipeline
from tiny_qwen import build_tiny_qwen_image

from flowalign.config import load_config
from flowalign.errors import FlowalignError
from flowalign.generators import PromptCache, load_generator
from flowalign.generators.qwen_image import QwenImageGenerator, rescale_to_norm
from flowalign.training import make_trainer as build_trainer

PROMPTS = ["a photo of a cat", "a red apple on a blue sky"]  # different lengths: the attention mask matters
OPTIONS = {"height": 32, "width": 32, "max_sequence_length": 64}
NEGATIVE = " "  # Qwen-Image's and Flow-GRPO's negative prompt


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_tiny_qwen_image(tmp_path_factory.mktemp("tiny_qwen_image") / "pipe")


def load(folder: Path, **options) -> QwenImageGenerator:
    gen = load_generator(str(folder), local_files_only=True, device="cpu", **{**OPTIONS, **options})
    gen.pipe.set_progress_bar_config(disable=True)
    return gen


def seeded_noise(gen, seed: int = 0) -> torch.Tensor:
    return gen.initial_noise(len(PROMPTS), torch.Generator().manual_seed(seed))


def packed(gen, x: torch.Tensor) -> torch.Tensor:
    return gen.pipe._pack_latents(x, x.shape[0], *gen.latent_shape)


@torch.no_grad()
def euler(gen, noise: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
    cond = gen.encode(PROMPTS, negative_prompt=NEGATIVE if guidance != 1.0 else None)
    sigmas, x = gen.sigmas(steps), noise.clone()
    for i in range(steps):
        x = x + (sigmas[i + 1] - sigmas[i]) * gen.velocity(x, sigmas[i], cond, guidance)
    return x


def run_pipeline(gen, noise: torch.Tensor, guidance: float, output_type: str) -> torch.Tensor:
    cfg = {"true_cfg_scale": guidance, "negative_prompt": NEGATIVE} if guidance != 1.0 else {"true_cfg_scale": 1.0}
    return gen.pipe(PROMPTS, height=32, width=32, num_inference_steps=3, latents=packed(gen, noise),
                    max_sequence_length=64, output_type=output_type, **cfg).images


def test_load_generator_picks_the_adapter_and_the_pipelines_noise(folder):
    import flowalign

    gen = load(folder)
    assert type(gen) is QwenImageGenerator and gen.trainable_module is gen.pipe.transformer
    assert gen.lora_format == ("QwenImagePipeline", "transformer") and gen.latent_shape == (4, 8, 8)
    pipe_noise = gen.pipe.prepare_latents(2, 4, 32, 32, torch.float32, "cpu", torch.Generator().manual_seed(5))
    torch.testing.assert_close(packed(gen, seeded_noise(gen, 5)), pipe_noise, rtol=0, atol=0)
    media = flowalign.generate(gen, PROMPTS, steps=2, guidance=4.0, negative_prompt=NEGATIVE)
    assert media.shape == (2, 3, 32, 32) and media.dtype == torch.float32 and 0 <= media.min() <= media.max() <= 1


def test_time_grid_is_the_exponential_dynamic_shift_with_terminal_stretch(folder):
    """By hand for 3 steps at 32x32 (16 image tokens): mu = 0.5 + (ln 3 - 0.5)/(8192 - 256)·(16 - 256);
    s' = e^mu / (e^mu + 1/s - 1) on s = 1, 2/3, 1/3; then 1 - s' stretched so the last is 0.02; then 0."""
    mu = 0.5 + (math.log(3) - 0.5) / (8192 - 256) * (16 - 256)
    shifted = [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in (1.0, 2 / 3, 1 / 3)]
    stretch = (1 - shifted[-1]) / (1 - 0.02)
    expected = torch.tensor([1 - (1 - s) / stretch for s in shifted] + [0.0])
    gen = load(folder)
    torch.testing.assert_close(gen.sigmas(3), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(load(folder, height=64).sigmas(3), expected)  # more tokens, more shift


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_euler_matches_the_pipeline(folder, guidance):
    """Packing, masks, timestep t/1000, the grid, true CFG with norm rescaling and the VAE de-normalisation: the
    pipeline's latents and images to 1e-5 (fp32; CFG's branches batched in one masked pass differ by ~1e-6)."""
    gen = load(folder)
    noise = seeded_noise(gen, 3)
    ours = euler(gen, noise, 3, guidance)
    torch.testing.assert_close(packed(gen, ours), run_pipeline(gen, noise, guidance, "latent"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gen.decode(ours), run_pipeline(gen, noise, guidance, "pt"), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_norm_rescale_is_per_patch_token_and_can_be_turned_off(folder):
    """By hand: each 2x2 patch of 4 channels (16 values) of ones, rescaled to a reference token of 3s (norm 12)
    becomes 3s. With norm_rescale off the velocity is plain CFG and leaves the pipeline's path."""
    reference = torch.ones(1, 4, 4, 4)
    reference[:, :, :2, :2] = 3.0  # one token of 3s, three of 1s
    torch.testing.assert_close(rescale_to_norm(torch.full((1, 4, 4, 4), 0.5), reference), reference)
    gen, plain = load(folder), load(folder, norm_rescale=False)
    cond = gen.encode(PROMPTS, negative_prompt=NEGATIVE)
    x, sigma = seeded_noise(gen, 1), torch.full((2,), 0.7)
    v_cond, v_uncond = gen.predict(x, sigma, cond.positive), gen.predict(x, sigma, cond.negative)
    torch.testing.assert_close(plain.velocity(x, sigma, cond, 4.0), v_uncond + 4.0 * (v_cond - v_uncond),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(gen.velocity(x, sigma, cond, 4.0), plain.velocity(x, sigma, cond, 4.0), atol=1e-3)


@torch.no_grad()
def test_padded_rows_stack_and_give_the_pipelines_prediction(folder):
    """encode pads to max_sequence_length (mask 0), so rows encoded one prompt at a time (as the prompt cache
    stacks them) predict as the batch does, and one prompt alone runs unmasked on its own tokens, as the pipeline."""
    gen = load(folder)
    cond = gen.encode(PROMPTS, negative_prompt=None)
    embeds, mask = cond.positive["prompt_embeds"], cond.positive["prompt_embeds_mask"]
    assert embeds.shape == (2, 64, 16) and mask.shape == (2, 64)
    theirs, their_mask = gen.pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=64)
    length = theirs.shape[1]
    torch.testing.assert_close(embeds[:, :length], theirs)
    assert torch.equal(mask[:, :length], their_mask) and not mask[:, length:].any() and not embeds[:, length:].any()
    x, sigma = seeded_noise(gen, 2), torch.tensor([0.9, 0.4])
    together = gen.predict(x, sigma, cond.positive)
    first = gen.encode(PROMPTS[:1], negative_prompt=None).positive
    alone, _ = gen.pipe.encode_prompt(PROMPTS[:1], device="cpu", max_sequence_length=64)
    direct = gen.pipe.transformer(hidden_states=packed(gen, x[:1]), encoder_hidden_states=alone, timestep=sigma[:1],
                                  encoder_hidden_states_mask=None, img_shapes=[[(1, 4, 4)]], return_dict=False)[0]
    torch.testing.assert_close(packed(gen, gen.predict(x[:1], sigma[:1], first)), direct)
    cache = PromptCache().bind(gen)
    cache.encode(PROMPTS[1:], negative_prompt=None)  # a row from an earlier call, stacked with a new one below
    stacked = cache.encode(PROMPTS, negative_prompt=None)
    assert cache.misses == 2
    torch.testing.assert_close(gen.predict(x, sigma, stacked.positive), together)


def test_bad_options_are_one_line_errors(folder):
    with pytest.raises(FlowalignError, match="multiples of 8, got 36x32"):
        load(folder, height=36)
    with pytest.raises(FlowalignError, match=r"max_sequence_length must be in \[1, 1024\]"):
        load(folder, max_sequence_length=2048)
    with pytest.raises(FlowalignError, match="unknown option 'num_frames'.*QwenImageGenerator"):
        load(folder, num_frames=9)


# ---------------------------------------------------------------- GRPO end to end


def make_trainer(folder: Path, work: Path, *overrides: str):
    prompt_file = work / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS + ["a dog on the grass"]) + "\n")
    cfg = load_config(None, [
        f"model.name={folder}", "model.local_files_only=true", f"model.options={OPTIONS}",
        "reward.weights={toy/ink: 1.0}", f"train.prompt_file={prompt_file}", "train.iterations=1",
        "train.prompts_per_iteration=2", "flow_grpo.group_size=2", "train.steps=3", "train.guidance=4.0",
        "sample.negative_prompt=' '", "train.eval_prompts=0", "train.rollout_batch=4", "train.train_batch=4",
        "train.updates_per_iteration=1", "train.lr=1e-2", "flow_grpo.clip_range=0.2", "train.lora_rank=4",
        "train.lora_alpha=8", "train.checkpoint_every=0", f"output_dir={work / 'run'}", *overrides])
    return build_trainer(cfg)


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """One GRPO iteration with true CFG 4 (both branches through the LoRA); the trainer and its ``final/``."""
    trainer = make_trainer(folder, tmp_path_factory.mktemp("grpo_qwen_image"))
    assert trainer.cfg.sample.negative_prompt == NEGATIVE
    history = trainer.fit(progress=False)
    assert len(history) == 1 and history[0]["reward/std"] > 0
    final = trainer.save_final()
    trainer.acc.end_training()
    return trainer, final


def test_final_lora_loads_into_the_pipeline_as_the_trained_policy(trained, folder):
    trainer, final = trained
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    pipe = QwenImagePipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    gen = trainer.gen
    noise = seeded_noise(gen, 0)[:1]
    call = {"height": 32, "width": 32, "num_inference_steps": 3, "max_sequence_length": 64, "output_type": "pt",
            "true_cfg_scale": 4.0, "negative_prompt": NEGATIVE}
    base = pipe(PROMPTS[:1], latents=packed(gen, noise), **call).images
    pipe.load_lora_weights(final)
    tuned = pipe(PROMPTS[:1], latents=packed(gen, noise), **call).images
    assert torch.isfinite(tuned).all() and not torch.allclose(base, tuned)
    loaded = QwenImageGenerator(pipe, **OPTIONS)
    cond = gen.encode(PROMPTS, negative_prompt=NEGATIVE)
    x, sigma = seeded_noise(gen, 1), gen.sigmas(3)[[0, 1]]
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, sigma, cond, 4.0), gen.velocity(x, sigma, cond, 4.0),
                                   rtol=1e-5, atol=1e-5)



def test_bf16_iteration_keeps_fp32_log_probs(folder, tmp_path):
    trainer = make_trainer(folder, tmp_path, "model.dtype=bfloat16")
    assert trainer.gen.dtype == torch.bfloat16
    history = trainer.fit(progress=False)
    assert all(math.isfinite(v) for v in history[0].values())
    rollout = trainer.rollout(1).rollout
    assert rollout.logp.dtype == torch.float32 and torch.isfinite(rollout.logp).all()
    trainer.acc.end_training()
