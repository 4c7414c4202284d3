"""Image reward plug-ins on tiny random models saved in the real checkpoint layouts (offline, CPU).

Each tiny model has the real architecture at toy width; it is saved the way the real checkpoint is stored
(``save_pretrained``, ``{"state_dict": ...}`` for HPS, the MLP ``.pth``, ``ImageReward.pt`` with BLIP's names)
and loaded back through ``rewards.load``. The layout tests list the real key names by hand.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from sd3_tiny import clip_tokenizer_offline
from torch import nn

from flowalign import rewards

PROMPTS = ["a photo of a cat", "a dog", "an astronaut riding a horse"]
NAMES = ["clipscore-hf", "pickscore", "hpsv2", "hpsv2.1", "aesthetic", "imagereward"]

# The real BLIP ViT (vit.py, timm-style) and BLIP BERT (med.py) names, as stored under ImageReward.pt's prefixes.
VIT_TOP = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"]
VIT_BLOCK = [f"{m}.{p}" for m in ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
             for p in ("weight", "bias")]
MED_TOP = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
           "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias", "embeddings.position_ids"]
MED_LAYER = [f"{m}.{p}" for m in ["attention.self.query", "attention.self.key", "attention.self.value",
                                  "attention.output.dense", "attention.output.LayerNorm",
                                  "crossattention.self.query", "crossattention.self.key", "crossattention.self.value",
                                  "crossattention.output.dense", "crossattention.output.LayerNorm",
                                  "intermediate.dense", "output.dense", "output.LayerNorm"] for p in ("weight", "bias")]
MLP_KEYS = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]


def seeded(make, seed: int = 0):
    torch.manual_seed(seed)
    return make().eval()


def aesthetic_state(in_features: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """improved-aesthetic-predictor's MLP (``self.layers = nn.Sequential(...)``), written out here independently
    of rewards.aesthetic; its state dict as stored in the .pth."""
    torch.manual_seed(seed)
    layers = nn.Sequential(nn.Linear(in_features, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                           nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    return {f"layers.{k}": v for k, v in layers.state_dict().items()}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("image_rewards")


@pytest.fixture(scope="module")
def clip_dir(root):
    """A tiny transformers CLIP (hidden 32, patch 32, 64 px) with the real CLIP BPE tokenizer, save_pretrained."""
    from transformers import CLIPConfig, CLIPModel

    folder = root / "clip"
    tokenizer = clip_tokenizer_offline(root / "clip_tokenizer")
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=64, patch_size=32),
        projection_dim=32)
    seeded(lambda: CLIPModel(config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hps_dir(root):
    """A tiny open_clip CLIP (the ViT-H-14 structure at width 32), saved as HPS does: {"state_dict": ...}."""
    import open_clip

    configs = root / "open_clip_configs"
    configs.mkdir()
    (configs / "tiny-hps-test.json").write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}))
    open_clip.add_model_config(configs)
    state = seeded(lambda: open_clip.create_model("tiny-hps-test", pretrained=None)).state_dict()
    folder = root / "hps"
    folder.mkdir()
    torch.save({"state_dict": state}, folder / "HPS_v2_compressed.pt")
    torch.save({"state_dict": {k: v * 0.9 for k, v in state.items()}}, folder / "HPS_v2.1_compressed.pt")
    return folder


@pytest.fixture(scope="module")
def aesthetic_file(root):
    """The aesthetic MLP's state dict as a .pth, input width = the tiny CLIP's projection_dim (32)."""
    file = root / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(aesthetic_state(32), file)
    return file


def blip_vit_name(key: str) -> str:
    """transformers BlipVisionModel name -> BLIP vit.py name (the inverse of the port's key map)."""
    fixed = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
             "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
             "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
             "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias"}
    if key in fixed:
        return fixed[key]
    index, rest = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key).groups()
    for new, old in [("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.qkv", "attn.qkv"),
                     ("self_attn.projection", "attn.proj")]:
        rest = rest.replace(new, old)
    return f"blocks.{index}.{rest}"


@pytest.fixture(scope="module")
def imagereward_dir(root):
    """A tiny ImageReward (BLIP ViT width 48, BERT width 32, MLP) saved as ImageReward.pt with BLIP's names,
    plus med_config.json and a BERT vocab.txt folder."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    folder = root / "imagereward"
    (folder / "tokenizer").mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "photo", "of", "cat", "dog", "horse"]
    (folder / "tokenizer" / "vocab.txt").write_text("\n".join(words) + "\n")
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 37,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 2,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(words) + 2,
           "encoder_width": 48, "add_cross_attention": True}
    (folder / "med_config.json").write_text(json.dumps(med))
    vision = seeded(lambda: BlipVisionModel(BlipVisionConfig(
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
        patch_size=32, layer_norm_eps=1e-6)))
    text = seeded(lambda: BlipTextModel(BlipTextConfig(
        vocab_size=len(words) + 2, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, encoder_hidden_size=48, is_decoder=True, bos_token_id=None, sep_token_id=None),
        add_pooling_layer=False), seed=1)
    state = {f"blip.visual_encoder.{blip_vit_name(k)}": v for k, v in vision.state_dict().items()}
    state |= {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(64).expand(1, -1)
    state |= {"blip.vision_proj.weight": torch.randn(16, 48), "blip.vision_proj.bias": torch.zeros(16),
              "blip.text_proj.weight": torch.randn(16, 32), "blip.text_proj.bias": torch.zeros(16)}
    state |= {f"mlp.{k}": v for k, v in aesthetic_state(32, seed=2).items()}
    torch.manual_seed(3)  # no weight left at its init value (LayerNorms start as ones/zeros: a swap would not show)
    state = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, folder / "ImageReward.pt")
    return folder


@pytest.fixture(scope="module")
def loaded(clip_dir, hps_dir, aesthetic_file, imagereward_dir):
    """Every plug-in, loaded once through the registry from the tiny checkpoints."""
    common = dict(local_files_only=True)
    return {
        "clipscore-hf": rewards.load("clipscore-hf", path=str(clip_dir), clamp=False, **common),  # random: cos < 0
        "pickscore": rewards.load("pickscore", path=str(clip_dir), processor_path=str(clip_dir), **common),
        "hpsv2": rewards.load("hpsv2", path=str(hps_dir), model="tiny-hps-test", **common),
        "hpsv2.1": rewards.load("hpsv2.1", path=str(hps_dir), model="tiny-hps-test", **common),
        "aesthetic": rewards.load("aesthetic", path=str(aesthetic_file), clip_path=str(clip_dir), **common),
        "imagereward": rewards.load("imagereward", path=str(imagereward_dir),
                                    tokenizer_path=str(imagereward_dir / "tokenizer"), vision_heads=2, **common),
    }


def media(shape=(3, 3, 48, 40), seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_scores_are_finite_per_sample(loaded, name):
    reward = loaded[name]
    assert reward.name == name and reward.modality == "image" and reward.differentiable
    scores = reward.score(media(), PROMPTS)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert not torch.allclose(scores, scores[:1].expand(3))  # depends on the sample


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_the_pixels(loaded, name):
    x = media().requires_grad_(True)
    loaded[name].score(x, PROMPTS).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_clip_scores_follow_their_formulas(loaded, clip_dir):
    from flowalign.rewards.loading import clip_image_features, clip_text_features

    clip, pick = loaded["clipscore-hf"], loaded["pickscore"]
    with torch.no_grad():
        image = clip_image_features(clip.model, media())
        cos = (image * clip_text_features(clip.model, clip.tokenizer, PROMPTS)).sum(-1)
    assert torch.allclose(clip.score(media(), PROMPTS), 100 * cos, atol=1e-5)
    clamped = rewards.load("clipscore-hf", path=str(clip_dir), local_files_only=True)
    assert torch.allclose(clamped.score(media(), PROMPTS), 100 * cos.clamp_min(0), atol=1e-5)
    assert torch.allclose(pick.score(media(), PROMPTS), pick.model.logit_scale.exp() * cos, atol=1e-4)
    scaled = rewards.load("pickscore", path=str(clip_dir), processor_path=str(clip_dir), local_files_only=True,
                          scale=26.0)
    assert torch.allclose(scaled.score(media(), PROMPTS) * 26, pick.score(media(), PROMPTS), atol=1e-4)


def test_clip_and_pickscore_equal_transformers_own_forward(loaded, clip_dir):
    """Expected values from transformers' CLIPModel forward (its logits_per_image = exp(logit_scale)·cos), with the
    image processor's normalisation constants, on images already at the model's size (no resampling to differ on):
    nothing of the project's loading code is involved."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPImageProcessor()  # its defaults are CLIP's normalisation constants
    tokens = CLIPTokenizer.from_pretrained(clip_dir)(PROMPTS, padding=True, return_tensors="pt")
    images = media((3, 3, 64, 64), seed=5)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=(images - mean) / std).logits_per_image.diagonal()
    cos = logits / model.logit_scale.exp()
    torch.testing.assert_close(loaded["pickscore"].score(images, PROMPTS), logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(loaded["clipscore-hf"].score(images, PROMPTS), 100 * cos, rtol=0, atol=1e-4)


def test_hf_clip_checkpoint_layout(clip_dir):
    keys = set(load_file(str(clip_dir / "model.safetensors")))
    for key in ["text_model.embeddings.token_embedding.weight", "text_model.final_layer_norm.weight",
                "vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.class_embedding",
                "vision_model.post_layernorm.weight", "visual_projection.weight", "text_projection.weight",
                "logit_scale"]:
        assert key in keys


def test_hps_checkpoint_matches_vit_h_14(hps_dir):
    """Same key names as upstream open_clip ViT-H-14 (built on the meta device: no memory, no weights)."""
    import open_clip

    def pattern(keys):
        return {re.sub(r"\.\d+\.", ".N.", k) for k in keys}

    tiny = torch.load(hps_dir / "HPS_v2_compressed.pt", weights_only=True)["state_dict"]
    with torch.device("meta"):
        real = open_clip.create_model("ViT-H-14", pretrained=None, device="meta").state_dict()
    assert len(real) == 686 and pattern(tiny) == pattern(real)


def test_hps_resize_max_pad_keeps_aspect():
    from flowalign.rewards.hps import resize_max_pad

    wide = torch.ones(1, 3, 20, 40)
    out = resize_max_pad(wide, 64)
    assert out.shape == (1, 3, 64, 64)
    assert out[..., :16, :].abs().max() == 0 and out[..., 48:, :].abs().max() == 0  # zero bands top and bottom
    assert torch.allclose(out[..., 17:47, :], torch.ones(1, 3, 30, 64), atol=1e-3)


def test_hps_versions_load_their_own_files(loaded):
    v2, v21 = loaded["hpsv2"], loaded["hpsv2.1"]
    assert not torch.equal(v2.model.visual.proj, v21.model.visual.proj)


def test_aesthetic_checkpoint_layout(aesthetic_file):
    state = torch.load(aesthetic_file, weights_only=True)
    assert sorted(state) == sorted(MLP_KEYS)
    shapes = [tuple(state[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)]
    assert shapes == [(1024, 32), (128, 1024), (64, 128), (16, 64), (1, 16)]


def test_aesthetic_mlp_width_mismatch_is_one_line(clip_dir, root):
    bad = root / "wide_mlp.pth"
    torch.save(aesthetic_state(768), bad)
    with pytest.raises(rewards.RewardError) as err:
        rewards.load("aesthetic", path=str(bad), clip_path=str(clip_dir), local_files_only=True)
    assert "aesthetic" in str(err.value) and str(bad) in str(err.value) and "\n" not in str(err.value)


def test_imagereward_checkpoint_layout(imagereward_dir):
    state = torch.load(imagereward_dir / "ImageReward.pt", weights_only=True)
    expected = {f"blip.visual_encoder.{k}" for k in VIT_TOP}
    expected |= {f"blip.visual_encoder.blocks.{i}.{k}" for i in range(2) for k in VIT_BLOCK}
    expected |= {f"blip.text_encoder.{k}" for k in MED_TOP}
    expected |= {f"blip.text_encoder.encoder.layer.{i}.{k}" for i in range(2) for k in MED_LAYER}
    expected |= {f"blip.{p}.{q}" for p in ("vision_proj", "text_proj") for q in ("weight", "bias")}
    expected |= {f"mlp.{k}" for k in MLP_KEYS}
    assert set(state) == expected
    assert state["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape == (32, 48)
    assert state["blip.visual_encoder.blocks.0.attn.qkv.weight"].shape == (3 * 48, 48)


def test_imagereward_padding_does_not_change_the_cls_output(loaded):
    """The text mask works: [CLS] is the same with or without padding to 35 tokens."""
    reward = loaded["imagereward"]
    with torch.no_grad():
        image = reward.vision(pixel_values=torch.randn(1, 3, 64, 64)).last_hidden_state
        outs = []
        for padding in ("max_length", "do_not_pad"):
            tokens = reward.tokenizer(["a photo of a cat"], padding=padding, max_length=35, return_tensors="pt")
            outs.append(reward.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                    encoder_hidden_states=image, is_decoder=False).last_hidden_state[:, 0])
    assert tokens["input_ids"].shape[1] < 35 and torch.allclose(outs[0], outs[1], atol=1e-5)


def _attend(q, k, v, heads, mask=None):
    """Multi-head scaled dot-product attention on [B,N,D] inputs; ``mask``: additive, broadcast to [B,1,1,M]."""
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return (logits + (0 if mask is None else mask)).softmax(-1).matmul(v).transpose(1, 2).flatten(2)


def _reference_imagereward(sd, pixels, ids, mask, vit_heads, bert_heads):
    """ImageReward's forward written from BLIP's description on the *original* key names (no transformers)."""
    F = torch.nn.functional
    lin = lambda x, name: F.linear(x, sd[name + ".weight"], sd[name + ".bias"])  # noqa: E731
    norm = lambda x, name, eps: F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)  # noqa
    v = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"],
                 stride=sd[v + "patch_embed.proj.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd[v + "pos_embed"]
    for i in range(2):
        b = f"{v}blocks.{i}."
        q, k, val = lin(norm(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, -1)
        x = x + lin(_attend(q, k, val, vit_heads), b + "attn.proj")
        x = x + lin(F.gelu(lin(norm(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image = norm(x, v + "norm", 1e-6)
    t = "blip.text_encoder."
    positions = sd[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    h = sd[t + "embeddings.word_embeddings.weight"][ids] + positions
    h = norm(h, t + "embeddings.LayerNorm", 1e-12)
    additive = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(2):
        b = f"{t}encoder.layer.{i}."
        a = _attend(lin(h, b + "attention.self.query"), lin(h, b + "attention.self.key"),
                    lin(h, b + "attention.self.value"), bert_heads, additive)
        h = norm(lin(a, b + "attention.output.dense") + h, b + "attention.output.LayerNorm", 1e-12)
        c = _attend(lin(h, b + "crossattention.self.query"), lin(image, b + "crossattention.self.key"),
                    lin(image, b + "crossattention.self.value"), bert_heads)
        h = norm(lin(c, b + "crossattention.output.dense") + h, b + "crossattention.output.LayerNorm", 1e-12)
        h = norm(lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense") + h, b + "output.LayerNorm", 1e-12)
    r = h[:, 0]
    for i in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{i}")
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_imagereward_port_matches_a_reference_on_the_original_names(loaded, imagereward_dir):
    """The key map keeps each weight's meaning: the port equals BLIP's forward computed on ImageReward.pt itself."""
    from flowalign.rewards.preprocess import clip_preprocess

    sd = torch.load(imagereward_dir / "ImageReward.pt", weights_only=True)
    reward = loaded["imagereward"]
    tokens = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        expected = _reference_imagereward(sd, clip_preprocess(media(), 64), tokens["input_ids"],
                                          tokens["attention_mask"], vit_heads=2, bert_heads=2)
    assert torch.allclose(reward.score(media(), PROMPTS), expected, atol=1e-4)


def test_imagereward_rejects_unknown_keys(imagereward_dir, root):
    folder = root / "imagereward_bad"
    folder.mkdir()
    state = torch.load(imagereward_dir / "ImageReward.pt", weights_only=True)
    state["blip.something_else.weight"] = torch.zeros(1)
    torch.save(state, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text((imagereward_dir / "med_config.json").read_text())
    with pytest.raises(rewards.RewardError, match=r"reward imagereward: cannot load .*something_else"):
        rewards.load("imagereward", path=str(folder), tokenizer_path=str(imagereward_dir / "tokenizer"),
                     local_files_only=True, vision_heads=2)


def test_wrong_layout_input_is_one_line(loaded):
    with pytest.raises(rewards.RewardError) as err:
        loaded["hpsv2"].score(torch.rand(3, 48, 40), PROMPTS)
    assert "hpsv2" in str(err.value) and "BCHW" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name,kwargs", [
    ("hpsv2", {"path": "/no/such/HPS_v2_compressed.pt"}),
    ("clipscore-hf", {"path": "/no/such/clip"}),
    ("imagereward", {"path": "/no/such/folder"}),
])
def test_missing_checkpoint_is_one_line(name, kwargs):
    with pytest.raises(rewards.RewardError) as err:
        rewards.load(name, local_files_only=True, **kwargs)
    message = str(err.value)
    assert message.startswith(f"reward {name}: cannot load {kwargs['path']}") and "\n" not in message
