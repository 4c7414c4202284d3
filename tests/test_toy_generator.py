"""The shipped toy digits generator: the interface, CFG batching, seeds, dtypes, and sample quality."""
import pytest
import torch

import flowalign
from flowalign import rewards
from flowalign.toy.prompts import sample_prompts


def test_interface_shapes(toy_generator):
    gen = toy_generator
    cond = gen.encode(["a handwritten seven", "the digit 3"])
    assert cond.positive["prompt_embeds"].shape[0] == 2 and cond.negative["pooled"].shape[0] == 2
    assert gen.encode(["a seven"], negative_prompt=None).negative is None
    sigmas = gen.sigmas(10)
    assert sigmas.shape == (11,) and sigmas[0] == 1 and sigmas[-1] == 0 and (sigmas.diff() < 0).all()
    x = gen.initial_noise(2, torch.Generator().manual_seed(0))
    assert x.shape == (2, *gen.latent_shape)
    media = gen.decode(x)
    assert media.shape == (2, 3, 16, 16) and media.min() >= 0 and media.max() <= 1


def test_cfg_is_one_batched_pass_equal_to_two(toy_generator):
    gen = toy_generator
    cond = gen.encode(["a handwritten seven", "the digit 3"])
    x = gen.initial_noise(2, torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7, 0.3])
    with torch.no_grad():
        guided = gen.velocity(x, sigma, cond, guidance=3.0)
        v_c = gen.predict(x, sigma, cond.positive)
        v_u = gen.predict(x, sigma, cond.negative)
    assert torch.allclose(guided, v_u + 3.0 * (v_c - v_u), atol=1e-4)  # batch-size-dependent fp32 rounding
    assert torch.allclose(gen.velocity(x, sigma, cond, guidance=1.0), v_c)


def test_conditioning_select_and_repeat(toy_generator):
    cond = toy_generator.encode(["a one", "a two", "a three"])
    rep = cond.repeat_interleave(2)
    assert rep.prompts == ["a one", "a one", "a two", "a two", "a three", "a three"]
    assert torch.equal(rep.positive["pooled"][2], cond.positive["pooled"][1])
    sel = rep.select([4, 0])
    assert sel.prompts == ["a three", "a one"] and torch.equal(sel.negative["pooled"][0], cond.negative["pooled"][2])


def test_same_seed_same_image_any_batch_size(toy_generator):
    prompts = ["a handwritten seven", "the digit 2", "a four"]
    a = flowalign.generate(toy_generator, prompts, seed=5, steps=8)
    b = flowalign.generate(toy_generator, prompts, seed=5, steps=8, batch_size=1)
    c = flowalign.generate(toy_generator, prompts, seed=6, steps=8)
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c)


def test_bf16_path_runs_and_stays_close():
    """Weights in bf16 on the CPU: the dtype plumbing holds and velocities come back in fp32."""
    gen = flowalign.load_generator("toy/digits", dtype="bfloat16", device="cpu")
    assert gen.dtype == torch.bfloat16 and gen.transformer.dtype == torch.bfloat16
    cond = gen.encode(["a handwritten seven"])
    x = gen.initial_noise(1, torch.Generator().manual_seed(0))
    v = gen.velocity(x, 0.5, cond, guidance=3.0)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    ref = flowalign.load_generator("toy/digits", device="cpu")
    media_bf16 = flowalign.generate(gen, ["a handwritten seven"] * 4, seed=0)
    media_fp32 = flowalign.generate(ref, ["a handwritten seven"] * 4, seed=0)
    assert (media_bf16 - media_fp32).abs().mean() < 0.1


def test_unknown_toy_model_is_one_line():
    with pytest.raises(flowalign.FlowalignError, match="unknown toy model"):
        flowalign.load_generator("toy/cats")


@pytest.mark.slow
def test_samples_are_the_prompted_digit(toy_generator):
    """The Must-show bar: at default steps and CFG the classifier agrees with the prompt on >= 90% of 500
    samples with balanced digits (a seed other than the demo's)."""
    prompts, digits = sample_prompts(500, seed=123)
    media = flowalign.generate(toy_generator, prompts, seed=123)
    match = rewards.load("toy/digit_match").score(media, prompts, [{"digit": d} for d in digits])
    assert match.mean() >= 0.9
