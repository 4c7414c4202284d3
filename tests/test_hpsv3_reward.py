"""HPSv3 on a tiny random Qwen2-VL (hidden 32, one layer, a one-block vision tower) with a RankNet head, saved as
``HPSv3.safetensors`` with the release's key names and loaded back through ``rewards.load`` (offline, CPU).

The reference is transformers' own path: ``Qwen2VLProcessor`` (image processor and image-token expansion) and
``Qwen2VLModel.forward`` with the 1-D positions HPSv3's forward gets under transformers 4.45.
"""
from __future__ import annotations

import hashlib

import pytest
import torch
from qwen_tiny import qwen2_tokenizer_offline
from safetensors.torch import save_file
from torch import nn

from flowalign import rewards
from flowalign.rewards import hpsv3

PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the grass"]
BUDGET = 56 * 56  # the test's pixel budget: a square image becomes 56 x 56, 2 x 2 merged tokens
#: Qwen2-VL-7B-Instruct's chat template, cut to what HPSv3 uses (default system turn, image placeholder, text).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The release's key names (HPSv3's Qwen2VLRewardModelBT under transformers 4.45), written out by hand.
VISION = ["visual.patch_embed.proj.weight", "visual.merger.ln_q.weight", "visual.merger.ln_q.bias",
          "visual.merger.mlp.0.weight", "visual.merger.mlp.0.bias", "visual.merger.mlp.2.weight",
          "visual.merger.mlp.2.bias"] + [f"visual.blocks.0.{m}.{p}" for m in
                                         ["norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
                                         for p in ("weight", "bias")]
TEXT = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight", "model.layers.0.self_attn.o_proj.weight"] + \
       [f"model.layers.0.self_attn.{m}_proj.{p}" for m in "qkv" for p in ("weight", "bias")] + \
       [f"model.layers.0.mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
HEAD = ["lm_head.weight"] + [f"rm_head.{i}.{p}" for i in (0, 3, 5) for p in ("weight", "bias")]
#: sha256 of HPSv3's text for "a photo of a cat": INSTRUCTION.format(text_prompt=...) + prompt_with_special_token,
#: computed from hpsv3/dataset/data_collator_qwen.py of github.com/MizzenAI/HPSv3 ("opensource HPSv3", 014a9cc).
TEXT_SHA256 = "ed13a1b1b6f42463518c1f55de40a864b97876aa12e6e2f367f0a0e44aa4196e"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The base folder (config + processor), the checkpoint folder, and the model and head as built here."""
    from transformers import Qwen2VLConfig, Qwen2VLImageProcessor, Qwen2VLModel, Qwen2VLProcessor, Qwen2VLVideoProcessor

    root = tmp_path_factory.mktemp("hpsv3")
    tokenizer = qwen2_tokenizer_offline(root / "tokenizer")
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=BUDGET, max_pixels=BUDGET),
                                 tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                                 chat_template=CHAT_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer) + 1, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=None, eos_token_id=None, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|image_pad|>"] + 100,
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    base = root / "base"
    processor.save_pretrained(base)
    config.save_pretrained(base)
    torch.manual_seed(0)
    model = Qwen2VLModel(config).eval()
    head = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.05), nn.Linear(64, 16), nn.ReLU(),
                         nn.Linear(16, 2)).eval()
    with torch.no_grad():  # no weight left at its init value (norms start as ones: a swap would not show)
        for p in [*model.parameters(), *head.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    state = {("model." + k[len("language_model."):] if k.startswith("language_model.") else k): v
             for k, v in model.state_dict().items()}
    state |= {"lm_head.weight": torch.randn(len(tokenizer) + 1, 32)} | {f"rm_head.{k}": v for k, v in
                                                                       head.state_dict().items()}
    (root / "ckpt").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, root / "ckpt" / "HPSv3.safetensors")
    return {"root": root, "base": base, "ckpt": root / "ckpt", "model": model, "head": head, "state": state}


def load(tiny, dtype: str = "float32"):
    return rewards.load("hpsv3", path=str(tiny["ckpt"]), base=str(tiny["base"]), local_files_only=True, dtype=dtype,
                        min_pixels=BUDGET, max_pixels=BUDGET)


def direct_scores(tiny, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """μ by transformers' own path: the processor's preprocessing and token expansion, ``Qwen2VLModel.forward``
    with 1-D positions on the three rope axes, the head at ``<|Reward|>``."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny["base"], local_files_only=True)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    reward_id = processor.tokenizer.convert_tokens_to_ids("<|Reward|>")
    chats = [processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": hpsv3.user_text(p)}]}], tokenize=False, add_generation_prompt=True)
        for p in prompts]
    arrays = [x.permute(1, 2, 0).numpy() for x in images]
    batch = processor(text=chats, images=arrays, do_rescale=False, padding=True, return_tensors="pt")
    b, length = batch["input_ids"].shape
    positions = torch.arange(length).expand(3, b, length)
    with torch.no_grad():
        hidden = tiny["model"](**batch, position_ids=positions).last_hidden_state
        return tiny["head"](hidden[batch["input_ids"] == reward_id])[:, 0]


def test_the_fixture_writes_the_release_key_names(tiny):
    assert set(tiny["state"]) == set(VISION + TEXT + HEAD)


def test_the_prompt_text_is_hpsv3s_to_the_character():
    assert hashlib.sha256(hpsv3.user_text("a photo of a cat").encode()).hexdigest() == TEXT_SHA256


def test_the_score_is_mu_of_a_direct_forward(tiny):
    reward = load(tiny)
    assert reward.name == "hpsv3" and reward.differentiable
    torch.manual_seed(1)
    images = torch.rand(2, 3, 56, 56)
    got = reward.score(images, PROMPTS)
    want = direct_scores(tiny, images, PROMPTS)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # float32, the same operations in another order
    assert not torch.allclose(got[0], got[1])


def test_resize_and_patches_match_the_image_processor(tiny):
    """A 40 x 72 image is resized to 56 x 84 (the budget's multiple of 28) by both; the patches agree."""
    from transformers import AutoProcessor

    reward = load(tiny)
    torch.manual_seed(2)
    images = torch.rand(1, 3, 40, 72)
    pixel_values, grid = reward.pixels(images)
    processor = AutoProcessor.from_pretrained(tiny["base"], local_files_only=True)
    want = processor.image_processor(images=[images[0].permute(1, 2, 0).numpy()], do_rescale=False,
                                     return_tensors="pt")
    assert grid.tolist() == want["image_grid_thw"].tolist() == [[1, 4, 6]]
    torch.testing.assert_close(pixel_values, want["pixel_values"], atol=1e-4, rtol=0)
    torch.testing.assert_close(reward.score(images, PROMPTS[:1]), direct_scores(tiny, images, PROMPTS[:1]),
                               atol=1e-4, rtol=1e-4)


def test_gradients_reach_the_pixels_in_the_default_bfloat16(tiny):
    reward = load(tiny, dtype="bfloat16")  # the default: the release was trained and run in bfloat16
    assert reward.device_dtype[1] == torch.bfloat16 and reward.head[0].weight.dtype == torch.float32
    images = torch.rand(2, 3, 56, 56, requires_grad=True)
    scores = reward.score(images, PROMPTS)
    scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    torch.testing.assert_close(scores.detach(), load(tiny).score(images.detach(), PROMPTS), atol=0.01, rtol=0)


def test_a_checkpoint_in_another_layout_is_one_line(tiny, tmp_path):
    """transformers 5 names (``model.language_model.*``, ``model.visual.*``) and no head: not the release."""
    renamed = {("model.language_model." + k[6:] if k.startswith("model.") else
                "model." + k if k.startswith("visual.") else k): v for k, v in tiny["state"].items()
               if not k.startswith("rm_head.")}
    save_file({k: v.contiguous() for k, v in renamed.items()}, tmp_path / "HPSv3.safetensors")
    with pytest.raises(rewards.RewardError, match=r"^reward hpsv3: cannot load .*not HPSv3's layout") as err:
        rewards.load("hpsv3", path=str(tmp_path), base=str(tiny["base"]), local_files_only=True, dtype="float32")
    assert "\n" not in str(err.value)
    with pytest.raises(rewards.RewardError, match="dtype must be one of"):
        rewards.load("hpsv3", path=str(tiny["ckpt"]), dtype="double")
