"""GRPO end to end on a tiny random SD3 pipeline: train a LoRA, save it in the diffusers format, and check
that a plain ``StableDiffusion3Pipeline`` loads all of it with ``load_lora_weights`` (same policy as trained)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors import safe_open
from sd3_tiny import build_tiny_sd3

from flowalign.config import load_config
from flowalign.training import make_trainer
from flowalign.training.lora import adapters_disabled
from flowalign.training.trainer import Trainer

PROMPTS = ["a photo of a cat", "a dog on the grass", "red apple, blue sky"]
RANK, ALPHA = 4, 8.0  # LoRA scale alpha / r = 2: a loader that ignored alpha would give another policy


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory) -> tuple[Trainer, Path]:
    """One GRPO iteration on the tiny SD3 (ink reward: works on any RGB image); the trainer and ``final/``."""
    work = tmp_path_factory.mktemp("grpo_sd3")
    prompt_file = work / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    overrides = [f"model.name={tiny_dir}", "model.local_files_only=true", "reward.weights={toy/ink: 1.0}",
                 f"train.prompt_file={prompt_file}", "train.iterations=1", "train.prompts_per_iteration=2",
                 "flow_grpo.group_size=2", "train.steps=3", "train.guidance=3.0", "train.eval_prompts=0",
                 "train.rollout_batch=4", "train.train_batch=4", "train.updates_per_iteration=1",
                 "train.lr=1e-2", "flow_grpo.clip_range=0.2", f"train.lora_rank={RANK}", f"train.lora_alpha={ALPHA}",
                 "train.checkpoint_every=0", f"output_dir={work / 'run'}"]
    trainer = make_trainer(load_config(None, overrides))
    history = trainer.fit(progress=False)
    assert len(history) == 1 and history[0]["reward/std"] > 0  # distinct rewards: non-zero advantages
    final = trainer.save_final()
    trainer.acc.end_training()
    return trainer, final


@pytest.fixture(scope="module")
def pipes(tiny_dir, trained):
    """A fresh pipeline's images on fixed latents, then the same pipeline with the trained LoRA loaded."""
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn((2, 4, 32, 32), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def sample() -> torch.Tensor:
        return pipe(PROMPTS[:2], num_inference_steps=3, guidance_scale=3.0, latents=latents.clone(), height=32,
                    width=32, output_type="pt").images

    base = sample()
    pipe.load_lora_weights(trained[1])
    return pipe, base, sample()


def _lora_modules(names) -> set[str]:
    return {n.split(".lora_")[0] for n in names if ".lora_A." in n or ".lora_B." in n}


def test_final_lora_is_in_the_diffusers_format(trained):
    trainer, final = trained
    weights = final / "pytorch_lora_weights.safetensors"
    assert final.is_dir() and weights.is_file()
    with safe_open(str(weights), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    assert state and all(k.startswith("transformer.") for k in state), sorted(state)[:3]
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state), sorted(state)
    trained_modules = _lora_modules(n for n, _ in trainer.gen.trainable_module.named_parameters())
    assert _lora_modules(k.removeprefix("transformer.") for k in state) == trained_modules  # every adapted layer
    assert any(v.abs().max() > 0 for k, v in state.items() if ".lora_B." in k)  # the update moved B off zero
    config = json.loads(metadata["lora_adapter_metadata"])  # the peft config, so the loader keeps alpha / r
    assert (config["transformer.r"], config["transformer.lora_alpha"]) == (RANK, ALPHA)


def test_pipeline_load_lora_weights_changes_the_samples(pipes):
    _, base, tuned = pipes
    assert base.shape == tuned.shape == (2, 3, 32, 32)
    assert torch.isfinite(tuned).all()
    assert not torch.allclose(base, tuned)


@torch.no_grad()
def test_loaded_lora_is_the_trained_policy(trained, pipes):
    """The pipeline's transformer with the loaded LoRA computes what the trained policy computes (all layers, scale)."""
    gen = trained[0].gen
    pipe = pipes[0]
    cond = gen.encode(PROMPTS[:2], negative_prompt=None)
    x = torch.randn((2, *gen.latent_shape), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.4])
    ours = gen.predict(x, sigma, cond.positive)
    theirs = pipe.transformer(hidden_states=x, timestep=sigma * pipe.scheduler.config.num_train_timesteps,
                              encoder_hidden_states=cond.positive["prompt_embeds"],
                              pooled_projections=cond.positive["pooled"], return_dict=False)[0]
    with adapters_disabled(gen.trainable_module, True):
        base = gen.predict(x, sigma, cond.positive)
    assert not torch.allclose(ours, base)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_the_shared_folder_loads_with_load_lora_weights(tiny_dir, trained, pipes):
    """``final/`` with its model card (README.md, images/): the card's code names the pipeline and its LoRA loader,
    and a fresh pipeline loading the folder samples exactly what the pipeline that loaded the bare LoRA sampled."""
    from huggingface_hub import ModelCard

    from flowalign.sharing import facts_of, write_model_card

    trainer, final = trained
    write_model_card(final.parent, facts_of(trainer.cfg, trainer.gen.lora_format, {}), "someone/sd3-lora")
    card = ModelCard.load(final / "README.md")
    assert card.data.base_model == str(tiny_dir) and "text-to-image" in card.data.tags
    assert f"pipe = StableDiffusion3Pipeline.from_pretrained({str(tiny_dir)!r}" in card.text
    assert "pipe.load_lora_weights('someone/sd3-lora')" in card.text
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(final)
    latents = torch.randn((2, 4, 32, 32), generator=torch.Generator().manual_seed(0))
    images = pipe(PROMPTS[:2], num_inference_steps=3, guidance_scale=3.0, latents=latents, height=32, width=32,
                  output_type="pt").images
    assert torch.equal(images, pipes[2])


@pytest.mark.parametrize("method", ["diffusion_nft", "awm", "dgpo"])
def test_forward_process_methods_train_sd3(tiny_dir, method, tmp_path):
    """DiffusionNFT, AWM and DGPO on the tiny SD3 with their SD3.5 configs' settings (shrunk): an iteration each,
    finite, the LoRA moved; DGPO samples with CFG and trains without it."""
    from flowalign.training.lora import trainable_state

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    cfg = load_config(f"configs/sd35/{method}_pickscore.yaml", [
        f"model.name={tiny_dir}", "model.local_files_only=true", "model.dtype=float32", "model.options={}",
        "reward.weights={toy/ink: 1.0}",
        f"train.prompt_file={prompt_file}", "train.iterations=1", "train.prompts_per_iteration=2",
        f"{method}.group_size=2", "train.steps=4", f"{method}.fm_draws=2", "train.eval_prompts=0",
        "train.rollout_batch=4", "train.train_batch=8", "train.mixed_precision=no",
        "train.gradient_checkpointing=false",
        f"train.lora_rank={RANK}", f"train.lora_alpha={ALPHA}", "train.checkpoint_every=0", "train.lr=1e-2",
        *(["dgpo.trunc_steps=2"] if method == "dgpo" else []), f"output_dir={tmp_path / 'run'}"])
    trainer = make_trainer(cfg)
    before = {k: v.clone() for k, v in trainable_state(trainer.gen.trainable_module, True).items()}
    history = trainer.fit(progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in history[0].values())
    after = trainable_state(trainer.gen.trainable_module, True)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    trainer.acc.end_training()
