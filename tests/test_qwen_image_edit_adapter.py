"""Qwen-Image-Edit on a tiny random QwenImageEditPipeline built offline (the tiny Qwen-Image's components and a
Qwen2-VL processor): the adapter samples what the pipeline samples for the same sources and latents (plain and true
CFG), the source conditions both the text embedding and the latents, and a GRPO iteration on a .jsonl prompt file
with sources saves a LoRA that the pipeline's own loader reads back as the trained policy."""
from __future__ import annotations

import json
import math

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_module
import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImagePipeline
from PIL import Image
from tiny_qwen import build_tiny_qwen_image
from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

from flowalign.config import load_config
from flowalign.errors import FlowalignError
from flowalign.generators import PromptCache, load_generator
from flowalign.generators.qwen_image_edit import QwenImageEditGenerator
from flowalign.training import make_trainer

PROMPTS = ["make the cat red", "put a red apple on the blue sky"]  # different lengths: masks matter
NEGATIVE = " "
HEIGHT, WIDTH = 32, 64  # latent 8x16 (VAE scale 4); the 2:1 sources below
VISION_AREA = HEIGHT * WIDTH  # the VL input of a 2:1 source is then 64x32, the pipeline's size at this area
OPTIONS = {"height": HEIGHT, "width": WIDTH, "max_sequence_length": 64, "vision_area": VISION_AREA}


@pytest.fixture(scope="module")
def edit(tmp_path_factory):
    """The tiny Qwen-Image components plus a Qwen2-VL processor as an edit pipeline folder, and 2:1 sources."""
    root = tmp_path_factory.mktemp("qwen_edit")
    base = QwenImagePipeline.from_pretrained(build_tiny_qwen_image(root / "base"), local_files_only=True)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=base.tokenizer,
                                 video_processor=Qwen2VLVideoProcessor())
    QwenImageEditPipeline(**base.components, processor=processor).save_pretrained(root / "pipe")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)).save(root / name)
    return root


def load(root, **options) -> QwenImageEditGenerator:
    gen = load_generator(str(root / "pipe"), local_files_only=True, device="cpu", **{**OPTIONS, **options})
    gen.pipe.set_progress_bar_config(disable=True)
    return gen


def sources(root, *names) -> list[dict]:
    return [{"image": str(root / name)} for name in names]


def packed(gen, x: torch.Tensor) -> torch.Tensor:
    return gen.pipe._pack_latents(x, x.shape[0], *gen.latent_shape)


@torch.no_grad()
def euler(gen, cond, noise: torch.Tensor, steps: int, guidance: float = 1.0) -> torch.Tensor:
    sigmas, x = gen.sigmas(steps), noise.clone()
    for i in range(steps):
        x = x + (sigmas[i + 1] - sigmas[i]) * gen.velocity(x, sigmas[i], cond, guidance)
    return x


def test_load_generator_picks_the_edit_adapter_and_the_pipelines_sizes(edit):
    gen = load(edit, vision_area=1024 * 1024)
    assert type(gen) is QwenImageEditGenerator and gen.latent_shape == (4, 8, 16)
    assert gen.lora_format == ("QwenImageEditPipeline", "transformer")
    # by hand, the pipeline's calculate_dimensions at 1024²: 3:2 -> w = sqrt(1024²·1.5) = 1254.1 -> 39·32 = 1248,
    # h = 1254.1/1.5 = 836.1 -> 26·32 = 832; square -> 1024; at 2048 px a 2:1 image -> 64x32
    assert gen.vision_size(Image.new("RGB", (300, 200))) == (832, 1248)
    assert gen.vision_size(Image.new("RGB", (50, 50))) == (1024, 1024)
    assert load(edit).vision_size(Image.new("RGB", (32, 16))) == (32, 64)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_euler_through_the_adapter_is_the_pipelines_edit(edit, monkeypatch, guidance):
    """Two prompts with their sources, the same latents and steps: the adapter's Euler latents and images equal the
    pipeline's (fp32, 1e-5). The pipeline's source area is patched from 1024² to VISION_AREA so that its resize of
    a 2:1 source is the output size (a 1024² source would not fit a fast test); the adapter gets that area too."""
    calculate = edit_module.calculate_dimensions
    monkeypatch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: calculate(VISION_AREA, ratio))
    gen = load(edit)
    noise = gen.initial_noise(2, torch.Generator().manual_seed(0))
    negative = NEGATIVE if guidance != 1.0 else None
    cond = gen.with_sources(gen.encode(PROMPTS, negative_prompt=negative), sources(edit, "a.png", "b.png"))
    ours = euler(gen, cond, noise, 3, guidance)
    for i, name in enumerate(("a.png", "b.png")):  # one call per edit: a list of images skips the VL resize
        call = {"image": Image.open(edit / name), "prompt": PROMPTS[i], "height": HEIGHT, "width": WIDTH,
                "num_inference_steps": 3, "latents": packed(gen, noise[i:i + 1]), "true_cfg_scale": guidance,
                "negative_prompt": negative}
        theirs = gen.pipe(output_type="latent", **call).images
        torch.testing.assert_close(packed(gen, ours[i:i + 1]), theirs, rtol=1e-5, atol=1e-5)
        pixels = gen.pipe(output_type="pt", **call).images
        torch.testing.assert_close(gen.decode(ours[i:i + 1]), pixels, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_the_source_conditions_the_text_and_the_output(edit):
    gen = load(edit)
    text = gen.encode([PROMPTS[0]] * 2, negative_prompt=NEGATIVE)
    two = gen.with_sources(text, sources(edit, "a.png", "b.png"))
    # the VL encoder sees the image in both branches: same text, other source, other embedding
    for branch in (two.positive, two.negative):
        assert not torch.allclose(branch["prompt_embeds"][0], branch["prompt_embeds"][1])
    assert two.positive["source_latents"].shape == (2, 4, 8, 16)
    assert torch.equal(two.positive["source_latents"], two.negative["source_latents"])
    noise = gen.initial_noise(1, torch.Generator().manual_seed(1)).expand(2, -1, -1, -1)
    edits = euler(gen, two, noise, 3, 4.0)
    again = euler(gen, gen.with_sources(text, sources(edit, "a.png", "a.png")), noise, 3, 4.0)
    assert (edits[0] - edits[1]).abs().mean() > 1e-4 and torch.equal(again[0], again[1])
    # rows through the prompt cache (token ids, the negative decoded back to its text) give the same conditioning
    cached_gen = load(edit)
    cache = PromptCache().bind(cached_gen)
    cached = cached_gen.with_sources(cached_gen.encode([PROMPTS[0]] * 2, negative_prompt=NEGATIVE),
                                     sources(edit, "a.png", "b.png"))
    assert cache.misses == 2  # the prompt once, the negative once
    for key in two.positive:
        torch.testing.assert_close(cached.positive[key], two.positive[key], rtol=0, atol=0)
        torch.testing.assert_close(cached.negative[key], two.negative[key], rtol=0, atol=0)


def test_missing_sources_are_one_line_errors(edit):
    gen = load(edit)
    text = gen.encode(PROMPTS, negative_prompt=None)
    with pytest.raises(FlowalignError, match=r"Qwen-Image-Edit edits a source image: give prompts with an \"image\""):
        gen.with_sources(text, None)  # flowalign generate with plain prompts
    with pytest.raises(FlowalignError, match=r"Qwen-Image-Edit: prompt 'make the cat red' has no source image") as err:
        gen.with_sources(text, [{}, {}])
    assert "\n" not in str(err.value)
    with pytest.raises(FlowalignError, match="no source image in the conditioning"):
        gen.predict(gen.initial_noise(2), torch.ones(2), text.positive)


def test_bad_options_are_one_line_errors(edit):
    with pytest.raises(FlowalignError, match="multiples of 8, got 36x64"):
        load(edit, height=36)
    with pytest.raises(FlowalignError, match=r"vision_area must be a pixel count of at least 1024 \(32x32\), got 100"):
        load(edit, vision_area=100)
    with pytest.raises(FlowalignError, match=r"prompt 'a photo.*' has \d+ tokens, more than max_sequence_length \(4"):
        load(edit, max_sequence_length=4).encode(["a photo of a cat on the grass"])


# ---------------------------------------------------------------- GRPO end to end


def edit_trainer(edit, work, *overrides: str):
    prompt_file = work / "edits.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p, "image": str(edit / n)}) + "\n"
                                   for p, n in zip(PROMPTS, ("a.png", "b.png"))))
    cfg = load_config(None, [
        f"model.name={edit / 'pipe'}", "model.local_files_only=true", f"model.options={OPTIONS}",
        "reward.weights={toy/ink: 1.0}", f"train.prompt_file={prompt_file}", "train.iterations=1",
        "train.prompts_per_iteration=2", "flow_grpo.group_size=2", "train.steps=3", "train.guidance=4.0",
        "sample.negative_prompt=' '", "train.eval_prompts=0", "train.rollout_batch=4", "train.train_batch=4",
        "train.updates_per_iteration=1", "train.lr=1e-2", "flow_grpo.clip_range=0.2", "train.lora_rank=4",
        "train.lora_alpha=8", "train.checkpoint_every=0", f"output_dir={work / 'run'}", *overrides])
    return make_trainer(cfg)


def test_a_grpo_iteration_on_sources_saves_the_lora_the_pipeline_loads(edit, tmp_path, monkeypatch):
    trainer = edit_trainer(edit, tmp_path)
    history = trainer.fit(progress=False)
    assert history[0]["reward/std"] > 0 and all(math.isfinite(v) for v in history[0].values())
    final = trainer.save_final()
    trainer.acc.end_training()
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    pipe = QwenImageEditPipeline.from_pretrained(edit / "pipe", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    calculate = edit_module.calculate_dimensions
    monkeypatch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: calculate(VISION_AREA, ratio))
    gen = trainer.gen
    noise = packed(gen, gen.initial_noise(1, torch.Generator().manual_seed(0)))
    call = {"image": Image.open(edit / "a.png"), "prompt": PROMPTS[0], "negative_prompt": NEGATIVE, "height": HEIGHT,
            "width": WIDTH, "num_inference_steps": 3, "output_type": "pt", "true_cfg_scale": 4.0}
    base = pipe(latents=noise, **call).images
    pipe.load_lora_weights(final)
    tuned = pipe(latents=noise, **call).images
    assert torch.isfinite(tuned).all() and not torch.allclose(base, tuned)
    loaded = QwenImageEditGenerator(pipe, **OPTIONS)
    cond = gen.with_sources(gen.encode(PROMPTS, negative_prompt=NEGATIVE), sources(edit, "a.png", "b.png"))
    x, sigma = gen.initial_noise(2, torch.Generator().manual_seed(2)), gen.sigmas(3)[:2]
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, sigma, cond, 4.0), gen.velocity(x, sigma, cond, 4.0),
                                   rtol=1e-5, atol=1e-5)
        fresh = load(edit)
        assert not torch.allclose(fresh.velocity(x, sigma, cond, 4.0), gen.velocity(x, sigma, cond, 4.0))


def test_a_prompt_row_without_a_source_stops_the_run_before_the_model_loads(edit, tmp_path, monkeypatch):
    import flowalign.training.trainer as trainer_module

    (tmp_path / "plain.txt").write_text("make the cat red\n")
    cfg = load_config(None, [f"model.name={edit / 'pipe'}", "model.local_files_only=true",
                             f"train.prompt_file={tmp_path / 'plain.txt'}", f"output_dir={tmp_path / 'run'}"])
    monkeypatch.setattr(trainer_module, "load_generator", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(Exception, match=r"train.prompt_file: prompt 1 \('make the cat red'\) has no \"image\": "
                                        r"'.*pipe' edits images"):
        make_trainer(cfg)


def test_the_shipped_edit_config_and_its_sources_pass_the_checks(edit):
    from flowalign.checks import check_sources
    from flowalign.prompt_sets import read_prompt_set

    cfg = load_config("configs/qwen_image/edit_flow_grpo.yaml")
    assert cfg.model.name == "Qwen/Qwen-Image-Edit" and cfg.sample.negative_prompt == ""
    rows = read_prompt_set(cfg.train.prompt_file, "train.prompt_file")
    check_sources(str(edit / "pipe"), True, {"train.prompt_file": rows})
    gen = load(edit)
    cond = gen.with_sources(gen.encode(rows.prompts, ""), rows.metadata)
    assert cond.positive["source_latents"].shape == (3, *gen.latent_shape)
    assert cond.negative["prompt_embeds"].shape == cond.positive["prompt_embeds"].shape


def test_bf16_iteration_keeps_fp32_log_probs(edit, tmp_path):
    trainer = edit_trainer(edit, tmp_path, "model.dtype=bfloat16")
    assert trainer.gen.dtype == torch.bfloat16
    history = trainer.fit(progress=False)
    assert all(math.isfinite(v) for v in history[0].values())
    rollout = trainer.rollout(1).rollout
    assert rollout.logp.dtype == torch.float32 and torch.isfinite(rollout.logp).all()
    trainer.acc.end_training()
