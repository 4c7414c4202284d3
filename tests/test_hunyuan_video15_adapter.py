"""HunyuanVideo 1.5 text-to-video adapter on a tiny random pipeline built offline: loading, batch-first conditioning,
equality with ``HunyuanVideo15Pipeline`` (grid, CFG, guider options, VAE), one GRPO iteration and the saved LoRA
back in the plain pipeline."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import HunyuanVideo15Pipeline
from tiny_hunyuan_video15 import build_tiny_hunyuan_video15

from flowalign.config import load_config
from flowalign.errors import FlowalignError
from flowalign.generators import load_generator
from flowalign.generators.hunyuan_video15 import HunyuanVideo15Generator
from flowalign.training import make_trainer as build_trainer

#: The second prompt has quoted text, so the ByT5 glyph branch is encoded (the first gets zeros and a zero mask).
PROMPTS = ["a photo of a cat", 'a sign that says "hello world"']
#: 320 text tokens hold the tiny tokenizer's system prompt plus the prompt; the output does not depend on padding.
OPTIONS = {"height": 16, "width": 16, "num_frames": 9, "max_sequence_length": 320}
#: The same as pipeline call arguments (the pipeline keeps its padding length in ``tokenizer_max_length``).
OPTIONS_PIPE = {"height": 16, "width": 16, "num_frames": 9}
LATENT = (4, 3, 4, 4)  # 4 channels, (9-1)/4+1 frames, 16/4 x 16/4


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_tiny_hunyuan_video15(tmp_path_factory.mktemp("tiny_hunyuan_video15") / "pipe")


def load(folder: Path, **options) -> HunyuanVideo15Generator:
    return load_generator(str(folder), local_files_only=True, device="cpu", **{**OPTIONS, **options})


def pipeline(folder: Path, **guider) -> HunyuanVideo15Pipeline:
    """The plain pipeline, its guider reconfigured as ``pipe.guider.new(**guider)`` (the documented way)."""
    pipe = HunyuanVideo15Pipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_slicing()  # diffusers 0.42.1's VAE cannot decode a batch of 2 in one pass
    if guider:
        pipe.guider = pipe.guider.new(**guider)
    return pipe


def noise(seed: int, n: int = 2) -> torch.Tensor:
    return torch.randn((n, *LATENT), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def euler(gen, x: torch.Tensor, steps: int, guidance: float, cfg: bool) -> torch.Tensor:
    cond = gen.encode(PROMPTS, negative_prompt="" if cfg else None)
    sigmas, x = gen.sigmas(steps), x.clone()
    for i in range(steps):
        x = x + (sigmas[i + 1] - sigmas[i]) * gen.velocity(x, sigmas[i], cond, guidance)
    return x


# ---------------------------------------------------------------- loading and conditioning


def test_load_generator_picks_the_adapter_and_generates_video(folder):
    import flowalign

    gen = load(folder)
    assert type(gen) is HunyuanVideo15Generator and gen.trainable_module is gen.pipe.transformer
    assert (gen.latent_shape, gen.default_steps, gen.default_guidance) == (LATENT, 50, 6.0)
    assert gen.lora_format == ("HunyuanVideo15Pipeline", "transformer")
    video = flowalign.generate(gen, PROMPTS, steps=2, guidance=1.0)
    assert video.shape == (2, 9, 3, 16, 16) and video.dtype == torch.float32
    assert video.min() >= 0 and video.max() <= 1
    # no size given: the pipeline's default, the 16:9 bucket at the transformer's target_size (16 here, 4-px buckets)
    default = load(folder, height=None, width=None)
    assert (default.height, default.width) == (12, 20)


@torch.no_grad()
def test_conditioning_is_batch_first_and_selects_rows(folder):
    """Embeddings and masks of both encoders are batch-first: one selected row predicts what it does in the batch."""
    gen = load(folder)
    cond = gen.encode(PROMPTS)
    positive = cond.positive
    assert positive["prompt_embeds"].shape == (2, 320, 16) and positive["prompt_embeds_mask"].shape == (2, 320)
    assert positive["prompt_embeds_2"].shape == (2, 256, 32) and positive["prompt_embeds_mask_2"].shape == (2, 256)
    # ByT5 sees 'Text "hello world". ' (20 bytes + </s>) for the second prompt, nothing for the first
    assert positive["prompt_embeds_mask_2"].sum(1).tolist() == [0, 21]
    assert cond.negative["prompt_embeds_mask_2"].sum().item() == 0
    x, sigma = noise(1), torch.tensor([0.9, 0.4])
    both = gen.predict(x, sigma, positive)
    one = gen.predict(x[1:], sigma[1:], cond.select([1]).positive)
    torch.testing.assert_close(one, both[1:], rtol=1e-5, atol=1e-5)
    grouped = cond.repeat_interleave(2)
    torch.testing.assert_close(gen.predict(x[[1, 1]], sigma[[1, 1]], grouped.select([2, 3]).positive),
                               both[[1, 1]], rtol=1e-5, atol=1e-5)
    # the pipeline's own padding length (1000) gives the same velocity: padding tokens are masked out
    full = load(folder, max_sequence_length=1000)
    assert full.pipe.tokenizer_max_length == 1000 and gen.pipe.tokenizer_max_length == 320
    torch.testing.assert_close(full.predict(x, sigma, full.encode(PROMPTS, None).positive), both, rtol=1e-5, atol=1e-5)


def test_grid_is_the_pipelines_shifted_linspace(folder):
    """linspace(1, 0, 5)[:-1] = [1, .75, .5, .25] shifted by 5 (5s / (1 + 4s)): [1, 15/16, 5/6, 5/8], then 0."""
    gen = load(folder)
    expected = torch.tensor([1.0, 15 / 16, 5 / 6, 5 / 8, 0.0])
    torch.testing.assert_close(gen.sigmas(4), expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- equality with the pipeline


@pytest.mark.parametrize("guider, steps", [
    ({"guidance_scale": 1.0}, 2),  # no CFG: the pipeline encodes no negative branch
    ({"guidance_scale": 4.0}, 2),
    ({"guidance_scale": 4.0, "guidance_rescale": 0.7}, 1),
    ({"guidance_scale": 3.0, "use_original_formulation": True}, 1),
], ids=["no_cfg", "cfg", "cfg_rescale", "cfg_original"])
def test_euler_matches_the_pipeline(folder, guider, steps):
    """Euler through the adapter at the guider's scale equals the pipeline's own sampling from the same latents,
    within 1e-5 (fp32): timesteps σ·1000, zero image condition, both text encoders, CFG as the guider does it."""
    pipe = pipeline(folder, **guider)
    gen = HunyuanVideo15Generator(pipe, **OPTIONS)
    assert gen.default_guidance == guider["guidance_scale"]
    start = noise(3)
    ours = euler(gen, start, steps, gen.default_guidance, cfg=guider["guidance_scale"] != 1.0)
    run = {"num_inference_steps": steps, "latents": start.clone(), **OPTIONS_PIPE}
    torch.testing.assert_close(ours, pipe(PROMPTS, output_type="latent", **run).frames, rtol=1e-5, atol=1e-5)
    if guider == {"guidance_scale": 4.0}:  # and the VAE decode, once
        video = pipe(PROMPTS, output_type="pt", **run).frames
        torch.testing.assert_close(gen.decode(ours), video, rtol=1e-5, atol=1e-5)



def test_bad_options_are_one_line_errors(folder):
    with pytest.raises(FlowalignError, match="multiples of 4"):
        load(folder, height=18)
    with pytest.raises(FlowalignError, match="multiples of 4"):
        load(folder, height=16, width=None)
    with pytest.raises(FlowalignError, match="num_frames - 1 must be a multiple of 4"):
        load(folder, num_frames=8)
    with pytest.raises(FlowalignError, match="unknown option 'frames'.*HunyuanVideo15Generator"):
        load(folder, frames=9)
    with pytest.raises(FlowalignError, match="step window"):
        HunyuanVideo15Generator(pipeline(folder, stop=0.5), **OPTIONS)


# ---------------------------------------------------------------- GRPO end to end


def make_trainer(folder: Path, work: Path, *overrides: str):
    prompt_file = work / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS + ["a dog on the grass"]) + "\n")
    cfg = load_config(None, [
        f"model.name={folder}", "model.local_files_only=true", f"model.options={OPTIONS}",
        "reward.weights={video/temporal: 1.0}", f"train.prompt_file={prompt_file}", "train.iterations=1",
        "train.prompts_per_iteration=2", "flow_grpo.group_size=2", "train.steps=3", "train.guidance=3.0",
        "train.eval_prompts=0", "train.rollout_batch=4", "train.train_batch=4", "train.updates_per_iteration=1",
        "train.lr=1e-2", "flow_grpo.clip_range=0.2", "train.lora_rank=4", "train.lora_alpha=8",
        "train.checkpoint_every=0", f"output_dir={work / 'run'}", *overrides])
    return build_trainer(cfg)


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """One GRPO iteration (CFG 3, SDE rollouts, video/temporal reward); the trainer and its saved LoRA folder."""
    trainer = make_trainer(folder, tmp_path_factory.mktemp("grpo_hunyuan_video15"))
    history = trainer.fit(progress=False)
    assert len(history) == 1 and history[0]["reward/std"] > 0  # distinct rewards: non-zero advantages
    final = trainer.save_final()
    trainer.acc.end_training()
    return trainer, final


@torch.no_grad()
def sample(pipe: HunyuanVideo15Pipeline) -> torch.Tensor:
    return pipe(PROMPTS[:1], num_inference_steps=2, latents=noise(0, 1), output_type="pt", **OPTIONS_PIPE).frames


def test_final_lora_loads_into_the_pipeline_as_the_trained_policy(trained, folder):
    """The saved LoRA loads into a plain pipeline's transformer (the pipeline has no load_lora_weights), changes its
    samples, and an adapter on that pipeline computes the trained policy's velocity exactly."""
    trainer, final = trained
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    pipe = pipeline(folder, guidance_scale=1.0)
    loaded = HunyuanVideo15Generator(pipe, **OPTIONS)
    base = sample(pipe)
    pipe.transformer.load_lora_adapter(final, prefix="transformer", use_safetensors=True)
    tuned = sample(pipe)
    assert torch.isfinite(tuned).all() and not torch.allclose(base, tuned)
    gen = trainer.gen
    cond = gen.encode(PROMPTS, negative_prompt=None)
    x, sigma = noise(1), gen.sigmas(4)[[0, 2]]
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(x, sigma, cond.positive), gen.predict(x, sigma, cond.positive),
                                   rtol=1e-5, atol=1e-5)


def test_bf16_iteration_with_cached_offloaded_prompts_keeps_fp32_log_probs(folder, tmp_path):
    """bf16 weights (timesteps and masks cast as the pipeline does) with the shipped config's prompt cache and
    offloaded text encoders: the iteration is finite and the rollout log-probs stay float32."""
    trainer = make_trainer(folder, tmp_path, "model.dtype=bfloat16", "train.cache_prompts=true",
                           "train.text_encoders=offload")
    assert trainer.gen.dtype == torch.bfloat16
    history = trainer.fit(progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in history[0].values())
    rollout = trainer.rollout(1).rollout
    assert rollout.logp.dtype == torch.float32 and torch.isfinite(rollout.logp).all()
    trainer.acc.end_training()
