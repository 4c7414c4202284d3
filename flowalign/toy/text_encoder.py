"""The toy text encoder: open_clip's bundled BPE tokenizer, a compact vocabulary, a tiny transformer.

The full CLIP vocabulary (49,408 ids) would dwarf the model, so the encoder keeps an embedding only for
the token ids seen in its training captions; every other id maps to ``<unk>``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..rewards.toy.saved_model import SavedModel

PAD, UNK = 0, 1
EOT_ID = 49407  # open_clip's <end_of_text>, the largest id: its position is argmax(ids)


def clip_tokenizer(context_length: int):
    """open_clip's SimpleTokenizer (its BPE ships inside the wheel, so this works offline)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


class ToyTextEncoder(SavedModel):
    """Prompts -> token embeddings ``[B,L,D]`` and a pooled embedding ``[B,D]`` at the end-of-text token."""

    def __init__(self, known_ids: list[int], width: int = 64, layers: int = 2, heads: int = 4,
                 context_length: int = 16):
        super().__init__()
        self.config = dict(known_ids=sorted(set(known_ids)), width=width, layers=layers, heads=heads,
                           context_length=context_length)
        table = torch.full((EOT_ID + 1,), UNK, dtype=torch.long)
        table[torch.tensor(self.config["known_ids"])] = torch.arange(len(self.config["known_ids"])) + 2
        table[0] = PAD
        self.register_buffer("id_table", table, persistent=False)
        self.tokenizer = clip_tokenizer(context_length)
        self.token_embedding = nn.Embedding(len(self.config["known_ids"]) + 2, width)
        self.position_embedding = nn.Parameter(torch.randn(context_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)

    @property
    def width(self) -> int:
        return self.config["width"]

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts).to(self.id_table.device)

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenize(prompts)
        local = self.id_table[ids]
        h = self.token_embedding(local) + self.position_embedding[: ids.shape[1]]
        h = self.final_norm(self.transformer(h, src_key_padding_mask=local == PAD))
        pooled = h[torch.arange(h.shape[0], device=h.device), ids.argmax(dim=-1)]
        return h, pooled


def known_token_ids(captions: list[str], context_length: int) -> list[int]:
    """Every token id that appears in ``captions`` (plus start/end of text)."""
    ids = clip_tokenizer(context_length)(captions + [""])
    return sorted(int(i) for i in ids.unique() if i != 0)
