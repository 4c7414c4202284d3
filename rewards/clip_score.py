"""CLIPScore with open_clip models: ``w · max(cos(image, text), 0)`` (Hessel et al.; w = 100 by default).

Loads any open_clip model: an architecture name plus ``pretrained`` (a tag or a checkpoint file), or an
open_clip folder / hub repo (``local-dir:PATH`` / ``hf-hub:ORG/NAME``). Preprocessing is tensor-only, so
the score is differentiable with respect to the pixels.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .base import InputSpec, Reward
from .preprocess import clip_preprocess


class OpenCLIPScore(Reward):
    """CLIPScore with an open_clip model: ``weight · max(cos(image, prompt), 0)`` (differentiable)."""

    name = "clipscore"
    differentiable = True

    def __init__(self, model: str = "ViT-L-14", pretrained: str | None = "openai", weight: float = 100.0,
                 clamp: bool = True):
        super().__init__()
        import open_clip

        if Path(model).is_dir():
            model = f"local-dir:{model}"
        if model.startswith("local-dir:") and not Path(model[len("local-dir:"):]).is_dir():
            raise FileNotFoundError(f"clipscore: model folder {model[len('local-dir:'):]} does not exist")
        use_pretrained = None if model.startswith(("local-dir:", "hf-hub:")) else pretrained
        self.model = open_clip.create_model(model, pretrained=use_pretrained).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)
        self.weight, self.clamp = weight, clamp
        cfg = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
        size = self.model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size
        self.input_spec = InputSpec(range=(0.0, 1.0), layout="BCHW", size=(self.image_size, self.image_size))

    def embed_images(self, media: torch.Tensor) -> torch.Tensor:
        pixels = clip_preprocess(media, self.image_size, self.mean, self.std)
        return F.normalize(self.model.encode_image(pixels), dim=-1)

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(next(self.model.parameters()).device)
        return F.normalize(self.model.encode_text(tokens), dim=-1)

    def _score(self, media, prompts, metadata):
        cos = (self.embed_images(media) * self.embed_texts(prompts)).sum(-1)
        return self.weight * (cos.clamp_min(0) if self.clamp else cos)
