"""FLUX.2 adapters on tiny random pipelines built offline. [klein]: loading, the encoder's stacked layers, the time
grid, Euler sampling equal to ``Flux2KleinPipeline`` (with and without CFG, base and step-distilled), one GRPO
iteration, the saved LoRA back in the plain pipeline, the real config. [dev]: Euler sampling equal to
``Flux2Pipeline`` with its embedded guidance, and a LoRA round trip through ``Flux2Pipeline.load_lora_weights``."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from tiny_flux2 import OUT_LAYERS, QWEN_HIDDEN, build_tiny_flux2_dev, build_tiny_flux2_klein

from flowalign.config import load_config
from flowalign.errors import FlowalignError
from flowalign.generators import load_generator
from flowalign.generators.flux2 import Flux2Generator, Flux2KleinGenerator
from flowalign.training import make_trainer as build_trainer
from flowalign.training.trainer import Trainer

PROMPTS = ["a photo of a cat", "a red apple"]
OPTIONS = {"height": 16, "width": 16, "max_sequence_length": 32, "text_encoder_out_layers": list(OUT_LAYERS)}
#: The pipeline call that matches OPTIONS.
CALL = {"height": 16, "width": 16, "max_sequence_length": 32, "text_encoder_out_layers": OUT_LAYERS}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_tiny_flux2_klein(tmp_path_factory.mktemp("tiny_flux2_klein"))


@pytest.fixture(scope="module")
def gen(folder) -> Flux2KleinGenerator:
    return load(folder)


def load(folder: Path, **options) -> Flux2KleinGenerator:
    return load_generator(str(folder), local_files_only=True, device="cpu", **{**OPTIONS, **options})


def pipeline(folder: Path, **config) -> Flux2KleinPipeline:
    pipe = Flux2KleinPipeline.from_pretrained(folder, local_files_only=True)
    pipe.register_to_config(**config)
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


def pipeline_latents(gen, x: torch.Tensor) -> torch.Tensor:
    """What the pipeline returns for ``output_type="latent"``: batch norm undone, unpatchified (1 x 8x8 here)."""
    bn = gen.pipe.vae.bn
    std = torch.sqrt(bn.running_var + gen.pipe.vae.config.batch_norm_eps).view(1, -1, 1, 1)
    return gen.pipe._unpatchify_latents(x * std + bn.running_mean.view(1, -1, 1, 1))


# ---------------------------------------------------------------- loading and conventions


def test_load_generator_picks_the_adapter(gen):
    import flowalign

    assert type(gen) is Flux2KleinGenerator and gen.trainable_module is gen.pipe.transformer
    assert gen.latent_shape == (4, 4, 4)  # 1 latent channel x 2x2 patch; 16 px / VAE scale 2 / patch 2
    assert (gen.default_steps, gen.default_guidance) == (50, 4.0) and not gen.is_distilled
    assert gen.lora_format == ("Flux2KleinPipeline", "transformer")
    media = flowalign.generate(gen, PROMPTS, steps=2, guidance=1.0)
    assert media.shape == (2, 3, 16, 16) and media.dtype == torch.float32 and 0 <= media.min() <= media.max() <= 1


@torch.no_grad()
def test_encode_stacks_the_chosen_hidden_layers(gen):
    """Row b, token l: the hidden states of layers 1 and 2 side by side, computed here from the encoder itself."""
    cond = gen.encode(PROMPTS[:1], negative_prompt="")
    embeds = cond.positive["prompt_embeds"]
    assert embeds.shape == cond.negative["prompt_embeds"].shape == (1, 32, QWEN_HIDDEN * len(OUT_LAYERS))
    tok, messages = gen.pipe.tokenizer, [{"role": "user", "content": PROMPTS[0]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tok(text, return_tensors="pt", padding="max_length", max_length=32, truncation=True)
    hidden = gen.pipe.text_encoder(**inputs, output_hidden_states=True).hidden_states
    torch.testing.assert_close(embeds, torch.cat([hidden[1], hidden[2]], dim=-1))
    assert not torch.equal(embeds, cond.negative["prompt_embeds"])


def test_time_grid_is_the_empirical_mu_shift(gen):
    """By hand: 16 tokens, N = 3: mu from the two fitted lines (a·16 + b at 10 and 200 steps, linear in N), then
    the exponential shift e^mu / (e^mu + 1/s - 1) of linspace(1, 1/3, 3), then 0."""
    m10, m200 = 8.73809524e-05 * 16 + 1.89833333, 0.00016927 * 16 + 0.45666666
    mu = m200 + (3 - 200) * (m200 - m10) / 190
    expected = [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in np.linspace(1, 1 / 3, 3)] + [0.0]
    torch.testing.assert_close(gen.sigmas(3), torch.tensor(expected, dtype=torch.float32))


# ---------------------------------------------------------------- equality with diffusers


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_euler_matches_the_pipeline(gen, guidance):
    """Packing, 4-d ids, the timestep, the grid, real CFG with the "" prompt, and the batch-norm de-normalisation
    and VAE: the pipeline's own latents and images for the same noise, within 1e-5 (fp32)."""
    noise = seeded_noise(gen, 3)
    ours = euler(gen, noise, 3, guidance)
    run = dict(prompt=PROMPTS, num_inference_steps=3, guidance_scale=guidance, latents=noise.clone(), **CALL)
    theirs = gen.pipe(output_type="latent", **run).images
    torch.testing.assert_close(pipeline_latents(gen, ours), theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gen.decode(ours), gen.pipe(output_type="pt", **run).images, rtol=1e-5, atol=1e-5)
    if guidance != 1.0:  # the CFG branch changes the sample
        assert not torch.allclose(ours, euler(gen, noise, 3, 1.0), atol=1e-4)


def test_distilled_checkpoint_has_no_cfg(folder):
    """``is_distilled``: 4 steps and guidance 1 by default; the pipeline ignores guidance_scale, so guidance 4 here
    is an error, and guidance 1 gives the pipeline's output for any guidance_scale."""
    gen = Flux2KleinGenerator(pipeline(folder, is_distilled=True), **OPTIONS)
    assert gen.is_distilled and (gen.default_steps, gen.default_guidance) == (4, 1.0)
    noise = seeded_noise(gen, 5)
    ours = euler(gen, noise, 2, 1.0)
    theirs = gen.pipe(prompt=PROMPTS, num_inference_steps=2, guidance_scale=4.0, latents=noise.clone(),
                      output_type="latent", **CALL).images
    torch.testing.assert_close(pipeline_latents(gen, ours), theirs, rtol=1e-5, atol=1e-5)
    with pytest.raises(FlowalignError, match="step-distilled.*guidance to 1, got 4.0"):
        gen.velocity(noise, 0.5, gen.encode(PROMPTS), 4.0)


def test_bad_options_are_one_line_errors(folder):
    cases = [({"height": 18}, "multiples of 4, got 18x16"), ({"text_encoder_out_layers": [1]}, "1 x 16 features"),
             ({"text_encoder_out_layers": [2, 3]}, r"must lie in 0\.\.2"), ({"max_sequence_length": 0}, "positive"),
             ({"text_encoder_out_layers": 2}, "list of layer indices"), ({"guidance_scale": 2}, "unknown option")]
    for options, message in cases:
        with pytest.raises(FlowalignError, match=message) as err:
            load(folder, **options)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- GRPO end to end


def make_trainer(folder: Path, work: Path, *overrides: str) -> Trainer:
    prompt_file = work / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS + ["a dog on the grass"]) + "\n")
    cfg = load_config(None, [
        f"model.name={folder}", "model.local_files_only=true", f"model.options={OPTIONS}",
        "reward.weights={toy/ink: 1.0}", f"train.prompt_file={prompt_file}", "train.iterations=1",
        "train.prompts_per_iteration=2", "flow_grpo.group_size=2", "train.steps=3", "train.guidance=4.0",
        "train.eval_prompts=0", "train.rollout_batch=4", "train.train_batch=4", "train.updates_per_iteration=1",
        "train.lr=1e-2", "flow_grpo.clip_range=0.2", "train.lora_rank=4", "train.lora_alpha=8",
        "train.checkpoint_every=0", f"output_dir={work / 'run'}", *overrides])
    return build_trainer(cfg)


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """One GRPO iteration with CFG 4; the trainer and its saved ``final/`` LoRA."""
    trainer = make_trainer(folder, tmp_path_factory.mktemp("grpo_flux2"))
    history = trainer.fit(progress=False)
    assert len(history) == 1 and history[0]["reward/std"] > 0  # distinct rewards: non-zero advantages
    final = trainer.save_final()
    trainer.acc.end_training()
    return trainer, final


def test_lora_covers_both_block_kinds(trained):
    """Every target the adapter names is adapted: double-stream attention and feed-forwards, the single-stream
    fused projection and each single-stream output projection."""
    trainer, _ = trained
    adapted = {name for name, module in trainer.gen.trainable_module.named_modules() if hasattr(module, "lora_A")}
    assert "transformer_blocks.0.ff_context.linear_out" in adapted and "transformer_blocks.0.attn.to_out.0" in adapted
    assert {f"single_transformer_blocks.{i}.attn.{p}" for i in (0, 1) for p in ("to_qkv_mlp_proj", "to_out")} <= adapted
    assert len(adapted) == 12 + 2 * 2  # 12 linears in the double block, 2 in each single block


@torch.no_grad()
def test_final_lora_loads_into_the_pipeline_as_the_trained_policy(trained, folder):
    """The saved LoRA loads into a plain pipeline, changes its samples, and computes the trained policy exactly."""
    trainer, final = trained
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    pipe = pipeline(folder)
    run = dict(prompt=PROMPTS[:1], num_inference_steps=2, guidance_scale=1.0, output_type="pt",
               latents=torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(0)), **CALL)
    base = pipe(**run).images
    pipe.load_lora_weights(final)
    tuned = pipe(**run).images
    assert torch.isfinite(tuned).all() and not torch.allclose(base, tuned)
    gen, loaded = trainer.gen, Flux2KleinGenerator(pipe, **OPTIONS)
    cond = gen.encode(PROMPTS, negative_prompt=None)
    x, sigma = seeded_noise(gen, 1), gen.sigmas(4)[[0, 2]]
    torch.testing.assert_close(loaded.predict(x, sigma, cond.positive), gen.predict(x, sigma, cond.positive),
                               rtol=1e-5, atol=1e-5)


def test_the_real_config_runs_on_the_tiny_pipeline(folder, tmp_path):
    """configs/flux2/flow_grpo_pickscore.yaml shrunk (its method, Fast window, CFG 4, bf16 weights, gradient
    checkpointing): one iteration, finite, the LoRA moved, the log-probs in fp32."""
    from flowalign.training.lora import trainable_state

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    cfg = load_config("configs/flux2/flow_grpo_pickscore.yaml", [
        f"model.name={folder}", "model.local_files_only=true", f"model.options={OPTIONS}",
        "reward.weights={toy/ink: 1.0}", f"train.prompt_file={prompt_file}", "train.iterations=1",
        "train.prompts_per_iteration=2", "flow_grpo.group_size=2", "train.steps=4", "train.rollout_batch=4",
        "train.train_batch=4", "train.mixed_precision=no", "train.lora_rank=4", "train.lora_alpha=8",
        "train.checkpoint_every=0", "train.lr=1e-2", "flow_grpo.clip_range=0.2", f"output_dir={tmp_path / 'run'}"])
    trainer = build_trainer(cfg)
    assert trainer.gen.dtype == torch.bfloat16 and trainer.gen.pipe.transformer.is_gradient_checkpointing
    before = {k: v.clone() for k, v in trainable_state(trainer.gen.trainable_module, True).items()}
    history = trainer.fit(progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in history[0].values())
    after = trainable_state(trainer.gen.trainable_module, True)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    rollout = trainer.rollout(1).rollout
    assert rollout.logp.dtype == torch.float32 and torch.isfinite(rollout.logp).all()
    trainer.acc.end_training()


# ---------------------------------------------------------------- FLUX.2 [dev]


@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory) -> Path:
    return build_tiny_flux2_dev(tmp_path_factory.mktemp("tiny_flux2_dev"))


def test_dev_euler_matches_the_pipeline(dev_folder):
    """[dev]: the same layout and grid, Mistral's stacked layers, and the embedded guidance as a transformer input
    (the pipeline's guidance_scale), no CFG: its packed latents and images within 1e-5."""
    gen = Flux2Generator.from_pretrained(dev_folder, local_files_only=True, device="cpu", embedded_guidance=2.5,
                                         **OPTIONS)
    assert (gen.default_steps, gen.default_guidance, gen.lora_format) == (50, 1.0, ("Flux2Pipeline", "transformer"))
    gen.pipe.set_progress_bar_config(disable=True)
    noise = seeded_noise(gen, 4)
    ours = euler(gen, noise, 3, 1.0)
    run = dict(prompt=PROMPTS, num_inference_steps=3, guidance_scale=2.5, latents=noise.clone(), **CALL)
    torch.testing.assert_close(gen.pipe._pack_latents(ours), gen.pipe(output_type="latent", **run).images,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gen.decode(ours), gen.pipe(output_type="pt", **run).images, rtol=1e-5, atol=1e-5)
    cond, sigma = gen.encode(PROMPTS, negative_prompt=None), torch.full((2,), 0.6)
    with torch.no_grad():
        v25 = gen.predict(noise, sigma, cond.positive)
        gen.embedded_guidance = 4.0
        assert not torch.allclose(gen.predict(noise, sigma, cond.positive), v25)


@torch.no_grad()
def test_dev_lora_loads_into_flux2_pipeline(dev_folder, tmp_path):
    """A LoRA on the adapter's targets (random B, so it is not the identity), saved as the trainer saves it, loads
    with ``Flux2Pipeline.load_lora_weights`` and computes the same velocity."""
    from flowalign.training.lora import add_lora, save_lora_diffusers

    gen = Flux2Generator.from_pretrained(dev_folder, local_files_only=True, device="cpu", **OPTIONS)
    add_lora(gen.trainable_module, 4, 8.0, gen.lora_target_modules)
    torch.manual_seed(0)
    for name, param in gen.trainable_module.named_parameters():
        if "lora_B" in name:
            param.normal_(0, 0.1)
    save_lora_diffusers(gen.trainable_module, tmp_path, None, *gen.lora_format)
    pipe = Flux2Pipeline.from_pretrained(dev_folder, local_files_only=True)
    loaded = Flux2Generator(pipe, **OPTIONS)
    cond, x, sigma = gen.encode(PROMPTS, negative_prompt=None), seeded_noise(gen, 2), torch.tensor([0.9, 0.3])
    before = loaded.predict(x, sigma, cond.positive)
    pipe.load_lora_weights(tmp_path)
    after = loaded.predict(x, sigma, cond.positive)
    assert not torch.allclose(before, after, atol=1e-4)
    torch.testing.assert_close(after, gen.predict(x, sigma, cond.positive), rtol=1e-5, atol=1e-5)
