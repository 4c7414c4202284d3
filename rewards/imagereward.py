"""ImageReward v1.0 (Xu et al.), ported to transformers: ``(mlp(text_out[:, 0]) - 0.16717...) / 1.03333...``.

The original is BLIP (ViT-L/16 image encoder + a BERT whose layers cross-attend to the image tokens) and an
MLP head on the [CLS] output; the ``image-reward`` wheel pins old timm/fairscale, so this port runs the same
computation on transformers' BLIP classes, whose code follows BLIP's ``vit.py`` and ``med.py``:
``BlipVisionModel`` (fused ``qkv`` as BLIP's ViT, LayerNorm eps 1e-6) and ``BlipTextModel`` (BERT without
token-type embeddings, cross-attention keys/values of the image width, as BLIP's ``med.py``). ``ImageReward.pt``
loads through a key map from the original names:

- ``blip.visual_encoder.*``: timm-style ViT names renamed as transformers' own BLIP conversion script does
  (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
  ``norm``);
- ``blip.text_encoder.*``: the same names (``embeddings.*``, ``encoder.layer.N.{attention,crossattention,
  intermediate,output}.*``);
- ``mlp.layers.{0,2,4,6,7}.*``: ImageReward's MLP (the LAION aesthetic stack, input 768).
``blip.vision_proj``/``blip.text_proj`` (unused by the score) and ``position_ids`` buffers are dropped; every
other key must map, and every parameter must be filled. The text config comes from ``med_config.json``; the
vision config is read from the checkpoint's shapes (heads: ``width // 64`` unless ``vision_heads`` is given).
Verified here only against tiny random models saved in that layout, not against the real 1.8 GB checkpoint.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .aesthetic import AestheticMLP
from .base import Reward
from .loading import check_local, load_errors, load_state_dict_file, resolve_file, square_spec
from .preprocess import clip_preprocess

MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_LENGTH = 35
VISION_PREFIX, TEXT_PREFIX, MLP_PREFIX = "blip.visual_encoder.", "blip.text_encoder.", "mlp."
DROPPED = ("blip.vision_proj.", "blip.text_proj.")
BLOCK_RENAMES = {"norm1.": "layer_norm1.", "norm2.": "layer_norm2.", "attn.qkv.": "self_attn.qkv.",
                 "attn.proj.": "self_attn.projection.", "mlp.": "mlp."}
VISION_RENAMES = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                  "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                  "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
                  "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}


def vision_key(key: str) -> str:
    """BLIP ViT (timm-style) name -> ``BlipVisionModel`` name; an unknown name is returned unchanged."""
    if key in VISION_RENAMES:
        return VISION_RENAMES[key]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if match:
        index, rest = match.groups()
        for old, new in BLOCK_RENAMES.items():
            if rest.startswith(old):
                return f"encoder.layers.{index}.{new}{rest[len(old):]}"
    return key


def port_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ImageReward.pt`` names -> this module's names (``vision.*``, ``text.*``, ``mlp.*``)."""
    ported, unknown = {}, []
    for key, value in state.items():
        if key.startswith(DROPPED) or key.endswith("position_ids"):
            continue
        if key.startswith(VISION_PREFIX):
            ported["vision." + vision_key(key[len(VISION_PREFIX):])] = value
        elif key.startswith(TEXT_PREFIX):
            ported["text." + key[len(TEXT_PREFIX):]] = value
        elif key.startswith(MLP_PREFIX):
            ported[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"unexpected keys in the checkpoint: {unknown[:5]}")
    return ported


def vision_config(state: dict[str, torch.Tensor], heads: int | None):
    """BLIP ViT hyper-parameters read from the checkpoint's shapes (ViT-L/16 at 224 for ImageReward v1.0)."""
    from transformers import BlipVisionConfig

    width = state[VISION_PREFIX + "cls_token"].shape[-1]
    patch = state[VISION_PREFIX + "patch_embed.proj.weight"].shape[-1]
    grid = round((state[VISION_PREFIX + "pos_embed"].shape[1] - 1) ** 0.5)
    depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith(VISION_PREFIX + "blocks."))
    mlp = state[VISION_PREFIX + "blocks.0.mlp.fc1.weight"].shape[0]
    return BlipVisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=depth,
                            num_attention_heads=heads or max(1, width // 64), image_size=grid * patch,
                            patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0)


def text_config(med_config: dict, encoder_width: int):
    """``BlipTextConfig`` from BLIP's ``med_config.json`` (a BertConfig); cross-attention reads the image width."""
    from transformers import BlipTextConfig

    keys = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "max_position_embeddings", "layer_norm_eps", "hidden_dropout_prob",
            "attention_probs_dropout_prob", "initializer_range", "pad_token_id"]
    # is_decoder=True only builds the cross-attention layers; the forward pass runs bidirectional (is_decoder=False)
    return BlipTextConfig(**{k: med_config[k] for k in keys if k in med_config}, encoder_hidden_size=encoder_width,
                          is_decoder=True, bos_token_id=None, sep_token_id=None)


def load_tokenizer(path: str, local_files_only: bool):
    """BLIP's BERT tokenizer: ``bert-base-uncased`` vocabulary plus ``[DEC]`` and ``[ENC]`` (30524 ids)."""
    from transformers import BertTokenizer

    check_local(path)
    tokenizer = BertTokenizer.from_pretrained(path, local_files_only=local_files_only)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageReward(Reward):
    """ImageReward v1.0. ``path``: a folder or hub repo (default ``THUDM/ImageReward``) holding ``ImageReward.pt``
    and ``med_config.json``, or the ``.pt`` file itself with ``med_config.json`` beside it. ``tokenizer_path``: a
    BERT tokenizer (hub id or folder with ``vocab.txt``)."""

    name = "imagereward"
    differentiable = True

    def __init__(self, path: str = "THUDM/ImageReward", local_files_only: bool = False,
                 tokenizer_path: str = "bert-base-uncased", vision_heads: int | None = None):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        with load_errors(self.name, path):
            state = load_state_dict_file(resolve_file(path, "ImageReward.pt", local_files_only))
            folder = str(Path(path).parent) if Path(path).is_file() else path
            med = json.loads(Path(resolve_file(folder, "med_config.json", local_files_only)).read_text())
            self.vision = BlipVisionModel(vision_config(state, vision_heads))
            self.text = BlipTextModel(text_config(med, self.vision.config.hidden_size), add_pooling_layer=False)
            self.mlp = AestheticMLP(self.text.config.hidden_size)
            self.load_state_dict(port_state_dict(state))
        with load_errors(self.name, tokenizer_path):
            self.tokenizer = load_tokenizer(tokenizer_path, local_files_only)
        self.eval().requires_grad_(False)
        self.image_size = self.vision.config.image_size
        self.input_spec = square_spec(self.image_size)

    def _score(self, media, prompts, metadata):
        image = self.vision(pixel_values=clip_preprocess(media, self.image_size)).last_hidden_state
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                                return_tensors="pt")
        text = self.text(input_ids=tokens["input_ids"].to(media.device),
                         attention_mask=tokens["attention_mask"].to(media.device),
                         encoder_hidden_states=image, is_decoder=False).last_hidden_state
        return ((self.mlp(text[:, 0]) - MEAN) / STD).squeeze(-1)
