"""CLIPScore on a transformers CLIP: ``w · max(cos(image, text), 0)`` (Hessel et al.; w = 100, as torchmetrics)."""
from __future__ import annotations

from .base import Reward
from .loading import clip_image_features, clip_text_features, load_clip, load_errors, square_spec


class HFCLIPScore(Reward):
    """CLIPScore with a transformers ``CLIPModel`` and its tokenizer (hub id or local folder)."""

    name = "clipscore-hf"
    differentiable = True

    def __init__(self, path: str = "openai/clip-vit-large-patch14", local_files_only: bool = False,
                 weight: float = 100.0, clamp: bool = True):
        super().__init__()
        from transformers import AutoTokenizer

        with load_errors(self.name, path):
            self.model = load_clip(path, local_files_only)
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
        self.weight, self.clamp = weight, clamp
        self.input_spec = square_spec(self.model.config.vision_config.image_size)

    def _score(self, media, prompts, metadata):
        cos = (clip_image_features(self.model, media) * clip_text_features(self.model, self.tokenizer, prompts)).sum(-1)
        return self.weight * (cos.clamp_min(0) if self.clamp else cos)
