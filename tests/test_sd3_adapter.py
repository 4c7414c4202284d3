"""SD3Generator on a tiny random SD3 pipeline built offline: shapes, CFG, schedule, and equality with diffusers."""
from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps
from sd3_tiny import build_tiny_sd3

from flowalign.errors import FlowalignError
from flowalign.generators.sd3 import SD3Generator

PROMPTS = ["a photo of a cat", "a red apple"]
STEPS = 4
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="module")
def gen(tiny_dir) -> SD3Generator:
    return SD3Generator.from_pretrained(tiny_dir, local_files_only=True, device="cpu")


@torch.no_grad()
def euler(gen: SD3Generator, noise: torch.Tensor, steps: int = STEPS, guidance: float = GUIDANCE) -> torch.Tensor:
    """Plain Euler sampling over ``gen.sigmas``, decoded to images."""
    cond = gen.encode(PROMPTS)
    sigmas = gen.sigmas(steps)
    x = noise.clone()
    for i in range(steps):
        x = x + (sigmas[i + 1] - sigmas[i]) * gen.velocity(x, sigmas[i], cond, guidance)
    return gen.decode(x)


def noise(gen: SD3Generator, seed: int) -> torch.Tensor:
    return gen.initial_noise(len(PROMPTS), torch.Generator().manual_seed(seed))


def test_loads_with_expected_shapes(gen):
    assert isinstance(gen.pipe, StableDiffusion3Pipeline)
    assert gen.latent_shape == (4, 32, 32)
    assert gen.dtype == torch.float32 and gen.device == torch.device("cpu")
    assert gen.trainable_module is gen.pipe.transformer
    assert (gen.default_steps, gen.default_guidance) == (28, 7.0)


def test_encode_shapes(gen):
    cond = gen.encode(PROMPTS, negative_prompt="blurry")
    seq = 77 + gen.max_sequence_length  # CLIP tokens + T5 tokens
    for branch in (cond.positive, cond.negative):
        assert branch["prompt_embeds"].shape == (2, seq, 32)
        assert branch["pooled"].shape == (2, 64)
    assert not torch.equal(cond.positive["pooled"], cond.negative["pooled"])
    assert gen.encode(PROMPTS, negative_prompt=None).negative is None


@torch.no_grad()
def test_velocity_cfg_equals_two_predicts(gen):
    cond = gen.encode(PROMPTS)
    x = noise(gen, 0)
    sigma = torch.full((2,), 0.7)
    v = gen.velocity(x, 0.7, cond, guidance=GUIDANCE)
    uncond = gen.predict(x, sigma, cond.negative)
    cond_v = gen.predict(x, sigma, cond.positive)
    assert v.dtype == torch.float32 and v.shape == x.shape
    torch.testing.assert_close(v, uncond + GUIDANCE * (cond_v - uncond), rtol=1e-4, atol=1e-4)


def test_sigmas_match_the_pipeline(gen):
    sigmas = gen.sigmas(STEPS)
    assert sigmas.shape == (STEPS + 1,) and sigmas[-1] == 0 and sigmas[0] <= 1
    fresh = FlowMatchEulerDiscreteScheduler.from_config(gen.pipe.scheduler.config)
    retrieve_timesteps(fresh, STEPS)
    torch.testing.assert_close(sigmas, fresh.sigmas.float())
    gen.pipe(PROMPTS[:1], num_inference_steps=STEPS, output_type="latent")
    torch.testing.assert_close(sigmas, gen.pipe.scheduler.sigmas.float())


def test_dynamic_shifting_matches_the_pipeline(gen):
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(gen.pipe.scheduler.config, use_dynamic_shifting=True)
    pipe = StableDiffusion3Pipeline(**{**gen.pipe.components, "scheduler": scheduler})
    dynamic = SD3Generator(pipe, device="cpu")
    pipe(PROMPTS[:1], num_inference_steps=STEPS, output_type="latent")
    torch.testing.assert_close(dynamic.sigmas(STEPS), pipe.scheduler.sigmas.float())
    assert not torch.allclose(dynamic.sigmas(STEPS), gen.sigmas(STEPS))


def test_euler_sampling_is_deterministic_images(gen):
    images = euler(gen, noise(gen, 0))
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(euler(gen, noise(gen, 0)), images, rtol=0, atol=0)
    assert not torch.equal(euler(gen, noise(gen, 1)), images)


def test_euler_matches_diffusers_pipeline(gen):
    """Our convention (x_σ=(1-σ)x0+σε, v=ε-x0, Euler over ``sigmas``) is the one diffusers' SD3 pipeline uses."""
    latents = noise(gen, 3)
    ours = euler(gen, latents)
    theirs = gen.pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents.clone(),
                      height=32, width=32, output_type="pt").images
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)


def test_missing_directory_is_a_flowalign_error(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FlowalignError, match="no_such_model"):
        SD3Generator.from_pretrained(missing, local_files_only=True)
    with pytest.raises(FlowalignError, match="model_index.json"):
        SD3Generator.from_pretrained(tmp_path, local_files_only=True)


def test_user_path_load_generator_and_cli(tiny_dir, tmp_path):
    """The path a user's real checkpoint takes: load_generator on a folder, flowalign.generate, the CLI."""
    import flowalign
    from flowalign.cli import main

    loaded = flowalign.load_generator(str(tiny_dir), local_files_only=True, device="cpu")
    assert isinstance(loaded, SD3Generator)
    images = flowalign.generate(loaded, PROMPTS, steps=STEPS, guidance=GUIDANCE, seed=3)
    torch.testing.assert_close(images, euler(loaded, noise(loaded, 3)), rtol=1e-5, atol=1e-5)
    out = tmp_path / "sd3.png"
    assert main(["generate", "--model", str(tiny_dir), "--local-files-only", "--prompt", "a cat", "--num", "2",
                 "--steps", "2", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
