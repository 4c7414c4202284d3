"""Memory options for real runs: the prompt-embedding cache (on the fly or precomputed with
``flowalign embed-prompts``), CPU offload of the frozen text encoders, and dropping them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sd3_tiny import build_tiny_sd3
from tiny_pipelines import build_tiny_sdxl

import flowalign
from flowalign.config import load_config
from flowalign.generators.memory import offload_text_encoders, place_text_encoders, text_encoders
from flowalign.generators.prompt_cache import PromptCache

PROMPTS = ["a photo of a cat", "a dog on the grass", "red apple, blue sky"]


def _same(a: flowalign.Conditioning, b: flowalign.Conditioning) -> None:
    for branch_a, branch_b in ((a.positive, b.positive), (a.negative, b.negative)):
        assert (branch_a is None) == (branch_b is None)
        if branch_a is not None:
            assert branch_a.keys() == branch_b.keys()
            for k in branch_a:
                torch.testing.assert_close(branch_a[k], branch_b[k], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3_memory"))


def test_cache_encodes_each_prompt_once_and_equals_the_encoder():
    gen = flowalign.load_generator("toy/digits", device="cpu")
    direct = gen.encode(["a seven", "the digit 3", "a seven"], negative_prompt="")
    cache = PromptCache().bind(gen)
    first = gen.encode(["a seven", "the digit 3", "a seven"], negative_prompt="")
    assert cache.misses == 3  # two prompts + the negative ""
    again = gen.encode(["the digit 3", "a seven"], negative_prompt="")
    assert cache.misses == 3 and cache.requests == 10
    _same(first, direct)
    _same(again, direct.select([1, 0]))
    assert gen.encode(["a seven"], negative_prompt=None).negative is None
    assert all(t.device.type == "cpu" for rows in cache.rows.values() for t in rows.values())


def test_cache_keeps_the_unconditional_branch_apart_from_encoded_empty_prompts(tmp_path):
    """SDXL's empty negative prompt is zeros, not the encoded "": cached per branch, both stay right."""
    gen = flowalign.load_generator(str(build_tiny_sdxl(tmp_path / "sdxl")), device="cpu", local_files_only=True)
    direct = gen.encode(["", "a cat"], negative_prompt="")
    assert direct.negative["prompt_embeds"].abs().max() == 0 and direct.positive["prompt_embeds"][0].abs().max() > 0
    PromptCache().bind(gen)
    _same(gen.encode(["", "a cat"], negative_prompt=""), direct)


def test_saved_embeddings_serve_a_run_without_text_encoders(sd3_dir, tmp_path):
    """embed-prompts writes the file; with text_encoders=drop the encoders are freed, the file serves every
    prompt (the same tensors), and a prompt not in it is a one-line error naming the prompt and the file."""
    from flowalign.cli import main

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "embeds.safetensors"
    assert main(["embed-prompts", f"model.name={sd3_dir}", "model.local_files_only=true",
                 f"train.prompt_file={prompt_file}", "--out", str(out)]) == 0
    assert sorted(PromptCache.load(out).rows) == sorted([("positive", p) for p in PROMPTS] + [("negative", "")])

    gen = flowalign.load_generator(str(sd3_dir), device="cpu", local_files_only=True)
    direct = gen.encode(PROMPTS[::-1], negative_prompt="")
    place_text_encoders(gen, "drop", prompt_embeds=str(out))
    assert text_encoders(gen) == {} and gen.pipe.text_encoder is None and gen.pipe.text_encoder_3 is None
    _same(gen.encode(PROMPTS[::-1], negative_prompt=""), direct)
    with pytest.raises(flowalign.FlowalignError, match=r"'a horse'.*embeds\.safetensors.*embed-prompts"):
        gen.encode(["a horse"], negative_prompt="")


def test_bad_prompt_embedding_files_and_settings_are_one_line_errors(tmp_path, capsys):
    from safetensors.torch import save_file

    from flowalign.cli import main

    assert main(["embed-prompts", "model.name=toy/digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "give --prompt-file or set train.prompt_file" in err

    gen = flowalign.load_generator("toy/digits", device="cpu")
    with pytest.raises(flowalign.FlowalignError, match="needs train.prompt_embeds"):
        place_text_encoders(gen, "drop")
    with pytest.raises(flowalign.FlowalignError, match="missing.safetensors': file not found"):
        PromptCache.load(tmp_path / "missing.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(flowalign.FlowalignError, match="broken.safetensors': not a readable safetensors file"):
        PromptCache.load(tmp_path / "broken.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(flowalign.FlowalignError, match="not a flowalign prompt-embedding file"):
        PromptCache.load(tmp_path / "other.safetensors")
    from flowalign.config import ConfigError

    with pytest.raises(ConfigError, match="train.text_encoders"):
        load_config(None, ["train.text_encoders=gpu"])


def test_offloaded_encoders_sit_on_the_cpu_between_encodes(sd3_dir):
    """accelerate's hooks move each encoder to the generator's device for its forward and back after encode."""
    gen = flowalign.load_generator(str(sd3_dir), device="cpu", local_files_only=True)
    direct = gen.encode(PROMPTS, negative_prompt="")
    hooks = offload_text_encoders(gen)
    assert len(hooks) == 3
    for module in text_encoders(gen).values():
        assert module._hf_hook.hooks[-1].execution_device == gen.device if hasattr(module._hf_hook, "hooks") \
            else module._hf_hook.execution_device == gen.device
    offloaded = []
    for hook in hooks:
        original = hook.offload
        hook.offload = lambda original=original, hook=hook: (offloaded.append(hook), original())[1]
    _same(gen.encode(PROMPTS, negative_prompt=""), direct)
    assert len(offloaded) == 3
    gen.with_sources(direct, [{} for _ in PROMPTS])  # an editing model's encoders run here too: offloaded after
    assert len(offloaded) == 6
    assert all(p.device.type == "cpu" for m in text_encoders(gen).values() for p in m.parameters())


def test_trainer_with_cached_prompts_and_offloaded_encoders_matches_the_plain_run(sd3_dir, tmp_path):
    """One GRPO iteration on the tiny SD3 (CFG 3): cache + offload, and precomputed embeddings with the encoders
    dropped, give the same rewards and losses as the plain run."""
    from flowalign.cli import main
    from flowalign.training import make_trainer

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    embeds = tmp_path / "embeds.safetensors"
    assert main(["embed-prompts", f"model.name={sd3_dir}", "model.local_files_only=true",
                 f"train.prompt_file={prompt_file}", "--out", str(embeds)]) == 0
    base = [f"model.name={sd3_dir}", "model.local_files_only=true", "reward.weights={toy/ink: 1.0}",
            f"train.prompt_file={prompt_file}", "train.iterations=1", "train.prompts_per_iteration=2",
            "flow_grpo.group_size=2", "train.steps=3", "train.eval_prompts=0", "train.lora_rank=4",
            "train.checkpoint_every=0", "train.updates_per_iteration=1"]
    runs = []
    trainers = []
    for extra in ([], ["train.cache_prompts=true", "train.text_encoders=offload"],
                  [f"train.prompt_embeds={embeds}", "train.text_encoders=drop"]):
        tr = make_trainer(load_config(None, [*base, *extra, f"output_dir={tmp_path / str(len(runs))}"]))
        runs.append(tr.fit(progress=False)[0])
        trainers.append(tr)
    cache = trainers[1].prompt_cache  # each distinct prompt and the negative encoded once
    assert cache.misses == len(cache.rows) >= 2 and ("negative", "") in cache.rows
    assert trainers[2].prompt_cache.misses == 0 and trainers[2].gen.pipe.text_encoder_3 is None
    keys = [k for k in runs[0] if not k.startswith("time/")]
    assert "reward/mean" in keys and len(keys) > 3
    for run in runs[1:]:
        for key in keys:  # policy_loss is a mean of z-scores x ratios, ~0 on-policy: compared to its O(1) scale
            assert run[key] == pytest.approx(runs[0][key], rel=1e-4, abs=1e-4), key
