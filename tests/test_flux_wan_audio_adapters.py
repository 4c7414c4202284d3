"""FLUX.1, Wan 2.1 / 2.2 and Stable Audio Open adapters on tiny random pipelines built offline: loading,
equality with the diffusers pipelines, one GRPO iteration each, and the saved LoRA back in diffusers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableAudioPipeline, UniPCMultistepScheduler, WanPipeline
from tiny_pipelines_video_audio import build_tiny_flux, build_tiny_stable_audio, build_tiny_wan

from flowalign import rewards
from flowalign.config import load_config
from flowalign.errors import FlowalignError
from flowalign.generators import load_generator
from flowalign.generators.flux import FluxGenerator
from flowalign.generators.stable_audio import StableAudioGenerator, enable_lora_adapters
from flowalign.generators.wan import WanGenerator
from flowalign.training import make_trainer as build_trainer
from flowalign.training.trainer import Trainer

PROMPTS = ["a photo of a cat", "a red apple"]
WAN = {"height": 16, "width": 16, "num_frames": 9, "max_sequence_length": 16}
#: family -> (builder, pipeline class, adapter options, adapter class)
FAMILIES = {
    "flux": (build_tiny_flux, FluxPipeline, {"height": 16, "width": 16}, FluxGenerator),
    "wan21": (build_tiny_wan, WanPipeline, WAN, WanGenerator),
    "wan22": (lambda d: build_tiny_wan(d, two_experts=True), WanPipeline, WAN, WanGenerator),
    "audio": (build_tiny_stable_audio, StableAudioPipeline, {}, StableAudioGenerator),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_pipelines")
    return {name: build(root / name) for name, (build, *_) in FAMILIES.items()}


def load(dirs, family: str, **options):
    return load_generator(str(dirs[family]), local_files_only=True, device="cpu", **{**FAMILIES[family][2], **options})


def pipeline(dirs, family: str):
    pipe = FAMILIES[family][1].from_pretrained(dirs[family], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def euler(gen, noise: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
    """Zero-noise sampling in flow coordinates: Euler over ``gen.sigmas``; returns the final latents."""
    cond = gen.encode(PROMPTS, negative_prompt="" if guidance != 1.0 else None)
    sigmas, x = gen.sigmas(steps), noise.clone()
    for i in range(steps):
        x = x + (sigmas[i + 1] - sigmas[i]) * gen.velocity(x, sigmas[i], cond, guidance)
    return x


def seeded_noise(gen, seed: int = 0) -> torch.Tensor:
    return gen.initial_noise(len(PROMPTS), torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("family", FAMILIES)
def test_load_generator_picks_the_adapter(dirs, family):
    """load_generator on the folder gives the family's adapter; flowalign.generate gives media of its modality."""
    import flowalign

    gen = load(dirs, family)
    assert type(gen) is FAMILIES[family][3]
    assert gen.lora_format[1] == "transformer" and gen.trainable_module is gen.pipe.transformer
    media = flowalign.generate(gen, PROMPTS, steps=2, guidance=1.0)
    expected = {"flux": ((2, 1, 16, 16), (2, 3, 16, 16)), "wan21": ((2, 16, 3, 2, 2), (2, 9, 3, 16, 16)),
                "audio": ((2, 3, 4), (2, 2, 7))}[family.replace("wan22", "wan21")]
    assert (tuple(seeded_noise(gen).shape), tuple(media.shape)) == expected
    low, high = (-1, 1) if gen.modality == "audio" else (0, 1)
    assert media.dtype == torch.float32 and media.min() >= low and media.max() <= high


def test_bad_options_and_paths_are_one_line_errors(dirs, tmp_path):
    with pytest.raises(FlowalignError, match="unknown option 'frames'.*WanGenerator"):
        load(dirs, "wan21", frames=9)
    with pytest.raises(FlowalignError, match="num_frames"):
        load(dirs, "wan21", num_frames=8)
    with pytest.raises(FlowalignError, match="train_expert"):
        load(dirs, "wan21", train_expert="low")  # Wan 2.1 has no low-noise expert
    with pytest.raises(FlowalignError, match="multiples of 2"):
        load(dirs, "flux", height=15)
    with pytest.raises(FlowalignError, match="no_such_model"):
        FluxGenerator.from_pretrained(tmp_path / "no_such_model", local_files_only=True)


# ---------------------------------------------------------------- equality with diffusers


@pytest.mark.parametrize("embedded, true_cfg", [(3.5, 1.0), (2.0, 2.5)])
def test_flux_euler_matches_the_pipeline(dirs, embedded, true_cfg):
    """Unpacked latents, packing, ids, embedded guidance, dynamic shift and real CFG as FluxPipeline does them."""
    gen = load(dirs, "flux", embedded_guidance=embedded)
    noise = seeded_noise(gen, 3)
    ours = euler(gen, noise, 4, true_cfg)
    cfg = {"true_cfg_scale": true_cfg, "negative_prompt": ""} if true_cfg != 1.0 else {}
    theirs = gen.pipe(PROMPTS, height=16, width=16, num_inference_steps=4, guidance_scale=embedded,
                      latents=gen.pipe._pack_latents(noise, 2, *gen.latent_shape), output_type="latent", **cfg).images
    torch.testing.assert_close(gen.pipe._pack_latents(ours, 2, *gen.latent_shape), theirs, rtol=1e-5, atol=1e-5)
    images = gen.pipe(PROMPTS, height=16, width=16, num_inference_steps=4, guidance_scale=embedded,
                      latents=gen.pipe._pack_latents(noise, 2, *gen.latent_shape), output_type="pt", **cfg).images
    torch.testing.assert_close(gen.decode(ours), images, rtol=1e-5, atol=1e-5)


def test_flux_embedded_guidance_reaches_the_transformer(dirs):
    gen = load(dirs, "flux")
    cond = gen.encode(PROMPTS, negative_prompt=None)
    x, sigma = seeded_noise(gen), torch.full((2,), 0.6)
    with torch.no_grad():
        v35 = gen.predict(x, sigma, cond.positive)
        gen.embedded_guidance = 1.0
        assert not torch.allclose(gen.predict(x, sigma, cond.positive), v35)


@pytest.mark.parametrize("family", ["wan21", "wan22"])
def test_wan_euler_matches_the_pipeline(dirs, family):
    """Timesteps σ·1000, CFG, the shift-7 grid, the two experts' switch and the VAE de-normalisation."""
    gen = load(dirs, family)
    noise = seeded_noise(gen, 3)
    ours = euler(gen, noise, 4, 5.0)
    frames = gen.pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, latents=noise.clone(), output_type="pt",
                      **WAN).frames
    torch.testing.assert_close(gen.decode(ours), frames, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_wan22_routes_each_sample_to_its_expert(dirs):
    gen = load(dirs, "wan22")
    assert gen.boundary == 875.0  # boundary_ratio 0.875 x 1000 train timesteps
    cond = gen.encode(PROMPTS, negative_prompt=None)
    x, sigma = seeded_noise(gen), torch.tensor([0.875, 0.874])  # t = 875 (high noise: t >= boundary), 874
    mixed = gen.predict(x, sigma, cond.positive)
    embeds = cond.positive["prompt_embeds"]
    high = gen.pipe.transformer(x[:1], sigma[:1] * 1000, embeds[:1], return_dict=False)[0]
    low = gen.pipe.transformer_2(x[1:], sigma[1:] * 1000, embeds[1:], return_dict=False)[0]
    torch.testing.assert_close(mixed, torch.cat([high, low]), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(low, gen.pipe.transformer(x[1:], sigma[1:] * 1000, embeds[1:], return_dict=False)[0])
    assert load(dirs, "wan22", train_expert="low").trainable_module is not gen.pipe.transformer


def test_wan_flow_unipc_grid_matches_the_pipeline(dirs):
    """Real Wan checkpoints ship UniPC with flow sigmas: the adapter's grid is the one the pipeline visits."""
    pipe = pipeline(dirs, "wan21")
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    gen = WanGenerator(pipe, **WAN)
    pipe(PROMPTS[:1], num_inference_steps=3, output_type="latent", **WAN)
    sigmas = gen.sigmas(3)
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas.float())
    assert sigmas.shape == (4,) and sigmas[-1] == 0 and sigmas[0] > 0.99


@torch.no_grad()
def test_stable_audio_denoiser_matches_the_pipeline(dirs):
    """At every noise level of a pipeline run (DPM-Solver, CFG with the pipeline's zero unconditional branch), the
    adapter's velocity in flow coordinates gives the pipeline's x0: ``x0 = x_flow - σ·v`` with
    ``x_flow = x/(1+s)``, ``σ = s/(1+s)``. Also the initial noise scaling, the grid and the decoder."""
    gen = load(dirs, "audio")
    pipe, steps, guidance = gen.pipe, 3, 7.0
    seen = []
    original_step = pipe.scheduler.step

    def recording_step(model_output, timestep, sample, **kwargs):
        out = original_step(model_output, timestep, sample, **kwargs)
        seen.append((model_output.clone(), sample.clone(), out.prev_sample.clone()))
        return out

    pipe.scheduler.step = recording_step
    randn = torch.randn((2, *gen.latent_shape), generator=torch.Generator().manual_seed(0))
    audio = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=randn.clone(),
                 generator=torch.Generator().manual_seed(1)).audios
    s = pipe.scheduler.sigmas
    sigmas = gen.sigmas(steps)
    torch.testing.assert_close(sigmas, (s / (1 + s)).float())
    start = gen.initial_state(seeded_noise(gen, 0), sigmas[0])  # randn(seed 0) in flow coordinates
    torch.testing.assert_close(start * (1 + s[0]), seen[0][1], rtol=1e-5, atol=1e-5)
    cond = gen.encode(PROMPTS)
    for i, (model_output, sample, _) in enumerate(seen):
        x0_pipeline = pipe.scheduler.precondition_outputs(sample, model_output, s[i])
        x_flow = sample / (1 + s[i])
        x0_ours = x_flow - sigmas[i] * gen.velocity(x_flow, sigmas[i], cond, guidance)
        torch.testing.assert_close(x0_ours, x0_pipeline, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gen.decode(seen[-1][2]), audio.clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_loudness_reward_is_the_rms_level():
    reward = rewards.load("audio/loudness")
    t = torch.linspace(0, 1, 400)
    sine = torch.sin(2 * torch.pi * 5 * t).expand(2, 2, -1) * torch.tensor([0.5, 0.1]).view(2, 1, 1)
    sine.requires_grad_(True)
    level = reward.score(sine)
    torch.testing.assert_close(level, 20 * torch.log10(torch.tensor([0.5, 0.1]) / 2 ** 0.5), rtol=1e-3, atol=1e-2)
    level.sum().backward()
    assert torch.isfinite(sine.grad).all() and sine.grad.abs().sum() > 0
    assert rewards.load("audio/loudness", target_db=-10.0).score(sine.detach())[0] == -(level[0] + 10).abs().detach()


# ---------------------------------------------------------------- GRPO end to end

REWARDS = {"flux": "toy/ink", "wan21": "video/temporal", "wan22": "video/temporal", "audio": "audio/loudness"}
GUIDANCE = {"flux": 1.0, "wan21": 3.0, "wan22": 1.0, "audio": 3.0}
EXTRA = {"wan22": {"train_expert": "low"}}  # the default (high) trains like Wan 2.1; test the other expert
STEPS = {"wan22": 4}  # shift 7: with 3 steps every SDE step is a high-noise one; with 4 the low expert gets two


def make_trainer(dirs, family: str, work: Path, *overrides: str) -> Trainer:
    prompt_file = work / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS + ["a dog on the grass"]) + "\n")
    options = {**FAMILIES[family][2], **EXTRA.get(family, {})}
    cfg = load_config(None, [
        f"model.name={dirs[family]}", "model.local_files_only=true", f"model.options={options}",
        f"reward.weights={{{REWARDS[family]}: 1.0}}", f"train.prompt_file={prompt_file}", "train.iterations=1",
        "train.prompts_per_iteration=2", "flow_grpo.group_size=2", f"train.steps={STEPS.get(family, 3)}",
        f"train.guidance={GUIDANCE[family]}", "train.eval_prompts=0", "train.rollout_batch=4", "train.train_batch=4",
        "train.updates_per_iteration=1",
        "train.lr=1e-2", "flow_grpo.clip_range=0.2", "train.lora_rank=4", "train.lora_alpha=8",
        "train.checkpoint_every=0", f"output_dir={work / 'run'}", *overrides])
    return build_trainer(cfg)


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request, dirs, tmp_path_factory):
    """One GRPO iteration per family; the trainer and its saved ``final/`` LoRA."""
    family = request.param
    trainer = make_trainer(dirs, family, tmp_path_factory.mktemp(f"grpo_{family}"))
    history = trainer.fit(progress=False)
    assert len(history) == 1 and history[0]["reward/std"] > 0  # distinct rewards: non-zero advantages
    final = trainer.save_final()
    trainer.acc.end_training()
    return family, trainer, final


def load_lora(pipe, family: str, final: Path) -> None:
    """How a user loads the saved LoRA into the plain diffusers pipeline."""
    if family == "audio":  # no load_lora_weights: the transformer's own loader (PeftAdapterMixin)
        enable_lora_adapters(pipe.transformer).load_lora_adapter(final, use_safetensors=True)
    elif family == "wan22":  # trained on the low-noise expert
        pipe.load_lora_weights(final, load_into_transformer_2=True)
    else:
        pipe.load_lora_weights(final)


@torch.no_grad()
def sample(pipe, family: str) -> torch.Tensor:
    """The pipeline's own sampling on fixed latents (seeded SDE noise for Stable Audio's DPM-Solver)."""
    latents = torch.randn((1, 1, 16, 16) if family == "flux" else (1, 16, 3, 2, 2) if family != "audio" else
                          (1, 3, 4), generator=torch.Generator().manual_seed(0))
    if family == "flux":
        return pipe(PROMPTS[:1], height=16, width=16, num_inference_steps=3,
                    latents=pipe._pack_latents(latents, 1, 1, 16, 16), output_type="pt").images
    if family == "audio":
        return pipe(PROMPTS[:1], num_inference_steps=3, latents=latents,
                    generator=torch.Generator().manual_seed(1)).audios
    return pipe(PROMPTS[:1], num_inference_steps=3, latents=latents, output_type="pt", **WAN).frames


def test_final_lora_loads_into_the_pipeline_as_the_trained_policy(trained, dirs):
    """The saved LoRA loads into a plain pipeline, changes its samples, and computes the trained policy exactly."""
    family, trainer, final = trained
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    pipe = pipeline(dirs, family)
    base = sample(pipe, family)
    load_lora(pipe, family, final)
    tuned = sample(pipe, family)
    assert torch.isfinite(tuned).all() and not torch.allclose(base, tuned)
    gen, loaded = trainer.gen, FAMILIES[family][3](pipe, **{**FAMILIES[family][2], **EXTRA.get(family, {})})
    cond = gen.encode(PROMPTS, negative_prompt=None)
    x, sigma = seeded_noise(gen, 1), gen.sigmas(4)[[0, 2]]  # both experts' ranges for Wan 2.2
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(x, sigma, cond.positive), gen.predict(x, sigma, cond.positive),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_iteration_keeps_fp32_log_probs(dirs, family, tmp_path):
    trainer = make_trainer(dirs, family, tmp_path, "model.dtype=bfloat16")
    assert trainer.gen.dtype == torch.bfloat16
    history = trainer.fit(progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in history[0].values())
    rollout = trainer.rollout(1).rollout
    assert rollout.logp.dtype == torch.float32 and torch.isfinite(rollout.logp).all()
    trainer.acc.end_training()


def test_flux_fastvideo_time_grid_is_the_papers(dirs):
    """DanceGRPO / MixGRPO's FLUX grid: linspace(1, 0, 5) shifted by 3, by hand 3s/(1+2s) = [1, 0.9, 0.75, 0.5, 0];
    the transformer sees sigma truncated to 1/1000 (0.12345 -> 0.123). The pipeline grid stays the default."""
    gen = load(dirs, "flux", time_grid="fastvideo", time_shift=3.0)
    assert torch.allclose(gen.sigmas(4).cpu(), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    seen, transformer = [], gen.pipe.transformer
    forward = transformer.forward

    def recording(*args, **kwargs):
        seen.append(kwargs["timestep"].clone())
        return forward(*args, **kwargs)

    transformer.forward = recording
    cond = gen.encode(PROMPTS, negative_prompt=None)
    with torch.no_grad():
        gen.predict(seeded_noise(gen), torch.full((2,), 0.12345), cond.positive)
    assert torch.allclose(seen[0].float(), torch.full((2,), 0.123))
    assert not torch.allclose(load(dirs, "flux").sigmas(4).cpu(), gen.sigmas(4).cpu())
    with pytest.raises(FlowalignError, match="time_grid must be 'pipeline' or 'fastvideo'"):
        load(dirs, "flux", time_grid="linear")


@pytest.mark.parametrize("method", ["diffusion_nft", "awm", "dgpo"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_process_methods_train_every_family_in_bf16(dirs, family, method, tmp_path):
    """DiffusionNFT, AWM and DGPO: one bf16 iteration on each tiny pipeline, finite losses, the LoRA moved. DGPO
    trains the high-noise end of the grid only: on Wan 2.2 it trains the high-noise expert (the default)."""
    from flowalign.training.lora import trainable_state

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS + ["a dog on the grass"]) + "\n")
    options = {**FAMILIES[family][2], **(EXTRA.get(family, {}) if method != "dgpo" else {})}
    steps = STEPS.get(family, 4)
    cfg = load_config(f"configs/toy/digits_{method}.yaml", [
        f"model.name={dirs[family]}", "model.local_files_only=true", f"model.options={options}", "model.dtype=bfloat16",
        f"reward.weights={{{REWARDS[family]}: 1.0}}", f"train.prompt_file={prompt_file}", "train.iterations=1",
        "train.prompts_per_iteration=2", f"{method}.group_size=2", f"train.steps={steps}", f"{method}.fm_draws=2",
        "train.guidance=1.0", "train.eval_prompts=0", "train.rollout_batch=4", "train.train_batch=8",
        "train.lr=1e-2", "train.lora_rank=4", "train.lora_alpha=8", "train.checkpoint_every=0",
        *(["dgpo.trunc_steps=2"] if method == "dgpo" else []), f"output_dir={tmp_path / 'run'}"])
    trainer = build_trainer(cfg)
    before = {k: v.clone() for k, v in trainable_state(trainer.gen.trainable_module, True).items()}
    history = trainer.fit(progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in history[0].values())
    after = trainable_state(trainer.gen.trainable_module, True)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    trainer.acc.end_training()
