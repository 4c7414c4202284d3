"""SD 1.5 (ε), SD 2.x (v-prediction) and SDXL adapters on tiny random pipelines built offline: the exact
DDPM <-> flow conversion, equality with diffusers' DDIM sampling, one GRPO iteration and its LoRA in diffusers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from tiny_pipelines import build_tiny_sd, build_tiny_sdxl

import flowalign
from flowalign.config import load_config
from flowalign.errors import FlowalignError
from flowalign.generators.sd import (
    StableDiffusionGenerator,
    continuous_timesteps,
    flow_sigmas,
    flow_velocity,
    vp_coefficients,
)
from flowalign.generators.sdxl import StableDiffusionXLGenerator
from flowalign.samplers.kernels import ddim, step
from flowalign.training import make_trainer
from flowalign.training.trainer import Trainer

PROMPTS = ["a photo of a cat", "a red apple"]
STEPS, GUIDANCE = 4, 5.0
FAMILIES = {  # name -> (builder, pipeline class, adapter class, prediction type)
    "sd15": (build_tiny_sd, StableDiffusionPipeline, StableDiffusionGenerator, "epsilon"),
    "sd2_v": (lambda d: build_tiny_sd(d, "v_prediction"), StableDiffusionPipeline, StableDiffusionGenerator,
              "v_prediction"),
    "sdxl": (build_tiny_sdxl, StableDiffusionXLPipeline, StableDiffusionXLGenerator, "epsilon"),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread (no OpenMP spin-waits when the CPU is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> tuple[str, Path]:
    """Each family's tiny pipeline, saved with ``save_pretrained`` into its own folder."""
    return request.param, FAMILIES[request.param][0](tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def gen(family) -> StableDiffusionGenerator:
    return flowalign.load_generator(str(family[1]), local_files_only=True, device="cpu")


def ddim_pipeline(gen: StableDiffusionGenerator):
    """The same pipeline sampling with DDIM (to ᾱ = 1 at the end, no x0 clipping)."""
    scheduler = DDIMScheduler.from_config(gen.pipe.scheduler.config, clip_sample=False, set_alpha_to_one=True)
    pipe = type(gen.pipe).from_pipe(gen.pipe, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_loads_through_load_generator(family, gen):
    name, _ = family
    _, pipeline_class, adapter_class, prediction_type = FAMILIES[name]
    assert type(gen) is adapter_class and isinstance(gen.pipe, pipeline_class)
    assert gen.prediction_type == prediction_type and gen.latent_shape == (4, 16, 16)
    assert gen.trainable_module is gen.pipe.unet and gen.lora_format == (pipeline_class.__name__, "unet")
    assert gen.default_steps == 50 and gen.default_guidance == (5.0 if name == "sdxl" else 7.5)


def test_ddpm_flow_conversion_is_exact():
    """x_t/(a+s) is the flow state at σ = s/(a+s); vp_coefficients inverts it; each prediction type gives ε - x0."""
    alphas_cumprod = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    t = torch.tensor([0, 1, 250, 981, 999])
    a, s = alphas_cumprod[t].sqrt().view(-1, 1), (1 - alphas_cumprod[t]).sqrt().view(-1, 1)
    x0, eps = torch.randn(5, 8), torch.randn(5, 8)
    x_t = a * x0 + s * eps
    sigma = flow_sigmas(alphas_cumprod)[t]
    torch.testing.assert_close(x_t / (a + s), (1 - sigma.view(-1, 1)) * x0 + sigma.view(-1, 1) * eps)
    a2, s2 = vp_coefficients(sigma.view(-1, 1))
    torch.testing.assert_close((a2, s2), (a, s))
    outputs = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}
    for kind, output in outputs.items():
        torch.testing.assert_close(flow_velocity(output, x_t, a, s, kind), eps - x0, rtol=1e-4, atol=1e-4)
    table = flow_sigmas(alphas_cumprod)
    assert torch.equal(continuous_timesteps(table[t], table), t.float())  # exact on the grid
    between = continuous_timesteps((table[t[2:]] + table[t[2:] - 1]) / 2, table)
    assert ((between > t[2:] - 1) & (between < t[2:])).all()


def test_sigmas_are_the_ddim_timesteps(gen):
    """σ grid = DDIM's own timesteps for the pipeline's config (leading spacing, steps_offset), then 0."""
    sigmas = gen.sigmas(STEPS)
    fresh = DDIMScheduler.from_config(gen.pipe.scheduler.config)
    fresh.set_timesteps(STEPS)
    assert fresh.timesteps.tolist() == [751, 501, 251, 1]
    assert torch.equal(continuous_timesteps(sigmas[:-1], gen._sigma_table), fresh.timesteps.float())
    assert sigmas[-1] == 0 and (sigmas[:-1] > sigmas[1:]).all()


@torch.no_grad()
def euler(gen: StableDiffusionGenerator, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Plain Euler steps in flow coordinates over ``gen.sigmas`` (CFG), from the state ``x``."""
    cond = gen.encode(PROMPTS)
    sigmas = gen.sigmas(steps)
    for i in range(steps):
        x = x + (sigmas[i + 1] - sigmas[i]) * gen.velocity(x, sigmas[i], cond, GUIDANCE)
    return x


def test_ode_sampling_equals_diffusers_ddim(gen):
    """Euler in flow coordinates (flowalign.generate) == the diffusers pipeline with DDIM, η = 0, same noise."""
    noise = gen.initial_noise(len(PROMPTS), torch.Generator().manual_seed(3))
    pipe = ddim_pipeline(gen)
    call = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=0.0)
    their_latents = pipe(PROMPTS, latents=noise.clone(), output_type="latent", **call).images
    their_images = pipe(PROMPTS, latents=noise.clone(), output_type="pt", **call).images
    our_latents = euler(gen, gen.initial_state(noise, gen.sigmas(STEPS)[0]), STEPS)
    torch.testing.assert_close(our_latents, their_latents, rtol=1e-5, atol=1e-5)
    images = flowalign.generate(gen, PROMPTS, steps=STEPS, guidance=GUIDANCE, seed=3)
    assert images.shape == their_images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images, their_images, rtol=0, atol=2e-6)
    unscaled = euler(gen, noise, STEPS)  # the start state must be ε/(a+s): the raw noise is another trajectory
    assert (unscaled - their_latents).abs().max() > 1e-2


@torch.no_grad()
def test_ddim_eta_step_matches_the_scheduler(gen):
    """samplers' ddim(η) step on the adapter's velocity == DDIMScheduler.step(eta=η), mean and std, mapped to flow."""
    eta, i = 0.7, 1
    scheduler = DDIMScheduler.from_config(gen.pipe.scheduler.config, clip_sample=False)
    scheduler.set_timesteps(STEPS)
    t, t_prev = scheduler.timesteps[i], scheduler.timesteps[i + 1]
    sigmas = gen.sigmas(STEPS)
    cond = gen.encode(PROMPTS, negative_prompt=None)
    x = torch.randn((2, *gen.latent_shape), generator=torch.Generator().manual_seed(5))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    a, s = vp_coefficients(sigmas[i])
    a_prev, s_prev = vp_coefficients(sigmas[i + 1])
    x_t = x * (a + s)
    unet_kwargs = gen._unet_kwargs(cond.positive, gen.dtype)
    output = gen.pipe.unet(x_t, t, encoder_hidden_states=cond.positive["prompt_embeds"], **unet_kwargs).sample
    theirs = scheduler.step(output, t, x_t, eta=eta, variance_noise=z).prev_sample
    ours = step(gen.predict(x, sigmas[i].expand(2), cond.positive), x, sigmas[i], sigmas[i + 1], noise=z,
                schedule=ddim(eta))
    torch.testing.assert_close(ours.x_next, theirs / (a_prev + s_prev), rtol=1e-5, atol=1e-5)
    std = eta * scheduler._get_variance(t, t_prev).sqrt() / (a_prev + s_prev)
    torch.testing.assert_close(ours.std, std.expand(2).float(), rtol=1e-5, atol=1e-7)
    assert ours.std.min() > 0.05 and ours.logp.dtype == torch.float32


def test_sdxl_conditioning(family, gen):
    """SDXL: pooled text embeds and (original, crop, target) time ids; "" gives the pipeline's zero negative."""
    if family[0] != "sdxl":
        pytest.skip("SDXL only")
    cond = gen.encode(PROMPTS)
    assert cond.positive["prompt_embeds"].shape == (2, 77, 64) and cond.positive["text_embeds"].shape == (2, 32)
    assert cond.positive["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    assert not cond.negative["text_embeds"].any() and not cond.negative["prompt_embeds"].any()
    assert gen.encode(PROMPTS, "blurry").negative["text_embeds"].any()


def test_bad_input_is_a_flowalign_error(tmp_path, gen):
    with pytest.raises(FlowalignError, match="no_such_model"):
        StableDiffusionGenerator.from_pretrained(tmp_path / "no_such_model", local_files_only=True)
    with pytest.raises(FlowalignError, match="model_index.json"):
        StableDiffusionXLGenerator.from_pretrained(tmp_path, local_files_only=True)
    scheduler = DDIMScheduler.from_config(gen.pipe.scheduler.config, prediction_type="flow")
    with pytest.raises(FlowalignError, match="prediction_type 'flow'"):
        type(gen)(type(gen.pipe).from_pipe(gen.pipe, scheduler=scheduler))


# ------------------------------------------------------------------ GRPO + LoRA in the diffusers format

def grpo(family: tuple[str, Path], work: Path, *extra: str) -> Trainer:
    prompt_file = work / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS + ["a dog on the grass"]) + "\n")
    overrides = [f"model.name={family[1]}", "model.local_files_only=true", "reward.weights={toy/ink: 1.0}",
                 f"train.prompt_file={prompt_file}", "train.iterations=1", "train.prompts_per_iteration=2",
                 "flow_grpo.group_size=2", "train.steps=3", "train.guidance=3.0", "train.eval_prompts=0",
                 "train.rollout_batch=4", "train.train_batch=4", "train.updates_per_iteration=1",
                 "train.lr=1e-2", "train.lora_rank=4", "train.lora_alpha=8.0", "train.checkpoint_every=0",
                 f"output_dir={work / 'run'}", *extra]
    return make_trainer(load_config(None, overrides))


@pytest.fixture(scope="module")
def trained(family, tmp_path_factory) -> tuple[Trainer, Path]:
    """One GRPO iteration (ink reward, 3 steps, LoRA); the trainer and its ``final/``."""
    trainer = grpo(family, tmp_path_factory.mktemp(f"grpo_{family[0]}"))
    history = trainer.fit(progress=False)
    assert len(history) == 1 and history[0]["reward/std"] > 0
    final = trainer.save_final()
    trainer.acc.end_training()
    return trainer, final


@torch.no_grad()
def test_trained_lora_loads_into_the_diffusers_pipeline(family, trained):
    """``pipe.load_lora_weights(final)`` changes the pipeline's samples, and its UNet is the trained policy."""
    trainer, final = trained
    pipe = FAMILIES[family[0]][1].from_pretrained(family[1], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))

    def sample() -> torch.Tensor:
        return pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, latents=latents.clone(),
                    output_type="pt").images

    with safe_open(str(final / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and ".lora_" in k for k in keys)
    base = sample()
    pipe.load_lora_weights(final)
    tuned = sample()
    assert torch.isfinite(tuned).all() and (tuned - base).abs().max() > 1e-4
    loaded = type(trainer.gen)(pipe, device="cpu")
    cond = loaded.encode(PROMPTS, negative_prompt=None)
    x = torch.randn((2, *loaded.latent_shape), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7, 0.3])
    torch.testing.assert_close(loaded.predict(x, sigma, cond.positive), trainer.gen.predict(x, sigma, cond.positive),
                               rtol=1e-5, atol=1e-5)


def test_bf16_weights_train_with_fp32_log_probs(family, tmp_path):
    """``model.dtype=bfloat16``: the rollout's stored log-probs and means are fp32, and an iteration trains."""
    if family[0] == "sd2_v":
        pytest.skip("same code path as sd15")
    trainer = grpo(family, tmp_path, "model.dtype=bfloat16")
    assert trainer.gen.dtype == torch.bfloat16
    rollout = trainer.rollout(0).rollout
    assert rollout.logp.dtype == rollout.mean.dtype == torch.float32 and torch.isfinite(rollout.logp).all()
    history = trainer.fit(progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in history[0].items() if k != "iteration")
    trainer.acc.end_training()
