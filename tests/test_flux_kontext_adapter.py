"""FLUX.1 Kontext (image editing) on a tiny random pipeline built offline: the adapter samples what the pipeline
samples for the same source image and latents, the source conditions the output, and a GRPO iteration on a .jsonl
prompt file with source images saves a LoRA that the pipeline's own loader reads back as the trained policy."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline, FluxPipeline
from PIL import Image
from tiny_pipelines_video_audio import build_tiny_flux

from flowalign.config import load_config
from flowalign.errors import FlowalignError
from flowalign.generators import load_generator
from flowalign.generators.flux_kontext import FluxKontextGenerator
from flowalign.training import make_trainer

PROMPTS = ["make the cat red", "add a hat"]
SIZE = 16


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    """The tiny FLUX.1 pipeline's components as a Kontext pipeline folder, and two source images."""
    root = tmp_path_factory.mktemp("kontext")
    flux = FluxPipeline.from_pretrained(build_tiny_flux(root / "flux"), local_files_only=True)
    FluxKontextPipeline(**{k: v for k, v in flux.components.items()}).save_pretrained(root / "pipe")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / name)
    return root


def load(root, **options) -> FluxKontextGenerator:
    return load_generator(str(root / "pipe"), local_files_only=True, device="cpu", height=SIZE, width=SIZE, **options)


def sources(root, *names) -> list[dict]:
    return [{"image": str(root / name)} for name in names]


@torch.no_grad()
def euler(gen, cond, noise: torch.Tensor, steps: int) -> torch.Tensor:
    sigmas, x = gen.sigmas(steps), noise.clone()
    for i in range(steps):
        x = x + (sigmas[i + 1] - sigmas[i]) * gen.velocity(x, sigmas[i], cond, 1.0)
    return x


def test_load_generator_picks_the_kontext_adapter(kontext):
    gen = load(kontext)
    assert type(gen) is FluxKontextGenerator and gen.embedded_guidance == 2.5
    assert gen.lora_format == ("FluxKontextPipeline", "transformer")


def test_euler_through_the_adapter_is_the_pipelines_edit(kontext):
    """Same source image, latents and steps: the adapter's Euler samples equal the pipeline's (fp32, 1e-5)."""
    gen = load(kontext, embedded_guidance=3.5)
    pipe = FluxKontextPipeline.from_pretrained(kontext / "pipe", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    noise = gen.initial_noise(1, torch.Generator().manual_seed(0))
    cond = gen.with_sources(gen.encode(PROMPTS[:1], negative_prompt=None), sources(kontext, "a.png"))
    ours = euler(gen, cond, noise, 3)
    c, h, w = gen.latent_shape
    theirs = pipe(image=Image.open(kontext / "a.png"), prompt=PROMPTS[:1], height=SIZE, width=SIZE,
                  max_area=SIZE * SIZE, _auto_resize=False, num_inference_steps=3, guidance_scale=3.5,
                  latents=pipe._pack_latents(noise, 1, c, h, w), output_type="latent").images
    torch.testing.assert_close(pipe._pack_latents(ours, 1, c, h, w), theirs, rtol=1e-5, atol=1e-5)


def test_the_source_image_conditions_the_output(kontext):
    gen = load(kontext)
    noise = gen.initial_noise(2, torch.Generator().manual_seed(1))
    text = gen.encode([PROMPTS[0]] * 2, negative_prompt=None)
    same = noise[:1].expand(2, -1, -1, -1)
    edits = euler(gen, gen.with_sources(text, sources(kontext, "a.png", "b.png")), same, 3)
    again = euler(gen, gen.with_sources(text, sources(kontext, "a.png", "a.png")), same, 3)
    # same noise and text: another source moves the sample (a random one-layer model attends to it only weakly:
    # measured 4e-4 mean); the same source twice gives the same sample to the bit
    assert (edits[0] - edits[1]).abs().mean() > 1e-4 and torch.equal(again[0], again[1])
    alone = euler(gen, text, noise[:1].expand(2, -1, -1, -1), 3)  # no metadata: text-only, as the pipeline
    assert not torch.allclose(alone[0], edits[0])
    with pytest.raises(FlowalignError, match=r"FLUX.1 Kontext: prompt 'make the cat red' has no source image") as err:
        gen.with_sources(text, [{}, {}])
    assert "\n" not in str(err.value)
    (kontext / "broken.png").write_bytes(b"not a png")
    with pytest.raises(FlowalignError, match=r"source image '.*broken.png' cannot be read"):
        gen.with_sources(text, sources(kontext, "a.png", "broken.png"))


def test_a_grpo_iteration_on_sources_saves_the_lora_the_pipeline_loads(kontext, tmp_path):
    prompt_file = tmp_path / "edits.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p, "image": str(kontext / n)}) + "\n"
                                   for p, n in zip(PROMPTS, ("a.png", "b.png"))))
    cfg = load_config(None, [
        f"model.name={kontext / 'pipe'}", "model.local_files_only=true", f"model.options={{height: {SIZE}, "
        f"width: {SIZE}}}", "reward.weights={toy/ink: 1.0}", f"train.prompt_file={prompt_file}", "train.iterations=1",
        "train.prompts_per_iteration=2", "flow_grpo.group_size=2", "train.steps=3", "train.guidance=1.0",
        "train.eval_prompts=0", "train.rollout_batch=4", "train.train_batch=4", "train.updates_per_iteration=1",
        "train.lr=1e-2", "train.lora_rank=4", "train.lora_alpha=8", "train.checkpoint_every=0",
        f"output_dir={tmp_path / 'run'}"])
    trainer = make_trainer(cfg)
    history = trainer.fit(progress=False)
    assert history[0]["reward/std"] > 0
    final = trainer.save_final()
    trainer.acc.end_training()
    pipe = FluxKontextPipeline.from_pretrained(kontext / "pipe", local_files_only=True)
    pipe.load_lora_weights(final)
    loaded = FluxKontextGenerator(pipe, height=SIZE, width=SIZE)
    gen = trainer.gen
    cond = gen.with_sources(gen.encode(PROMPTS, negative_prompt=None), sources(kontext, "a.png", "b.png"))
    x, sigma = gen.initial_noise(2, torch.Generator().manual_seed(2)), gen.sigmas(3)[:2]
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(x, sigma, cond.positive), gen.predict(x, sigma, cond.positive),
                                   rtol=1e-5, atol=1e-5)
        base = FluxKontextGenerator(FluxKontextPipeline.from_pretrained(kontext / "pipe", local_files_only=True),
                                    height=SIZE, width=SIZE)
        assert not torch.allclose(base.predict(x, sigma, cond.positive), gen.predict(x, sigma, cond.positive))


def test_a_prompt_row_without_a_source_stops_the_run_before_the_model_loads(kontext, tmp_path, monkeypatch):
    import flowalign.training.trainer as trainer_module

    (tmp_path / "plain.txt").write_text("make the cat red\n")
    cfg = load_config(None, [f"model.name={kontext / 'pipe'}", "model.local_files_only=true",
                             f"train.prompt_file={tmp_path / 'plain.txt'}", f"output_dir={tmp_path / 'run'}"])
    monkeypatch.setattr(trainer_module, "load_generator", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(Exception, match=r"train.prompt_file: prompt 1 \('make the cat red'\) has no \"image\": "
                                        r"'.*pipe' edits images"):
        make_trainer(cfg)


def test_the_shipped_edit_config_and_its_sources_pass_the_checks(kontext):
    from flowalign.checks import check_sources
    from flowalign.prompt_sets import read_prompt_set

    cfg = load_config("configs/flux/kontext_flow_grpo_edit.yaml")
    rows = read_prompt_set(cfg.train.prompt_file, "train.prompt_file")
    check_sources(str(kontext / "pipe"), True, {"train.prompt_file": rows})
    gen = load(kontext)
    assert gen.with_sources(gen.encode(rows.prompts, None), rows.metadata).positive["source_latents"].shape == \
        (3, *gen.latent_shape)
