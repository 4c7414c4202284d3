"""PickScore v1 (Kirstain et al.): ``logit_scale.exp() · cos(image, text)``, a CLIP-H fine-tuned on Pick-a-Pic.

The model is a transformers ``CLIPModel`` (``yuvalkirstain/PickScore_v1``); its tokenizer comes from the LAION
CLIP-H repo it was trained from. Scores are ~20; flow_grpo divides by 26 (``scale=26``). Tensor-only
preprocessing, so gradients reach the pixels.
"""
from __future__ import annotations

from .base import Reward
from .loading import clip_image_features, clip_text_features, load_clip, load_errors, square_spec


class PickScore(Reward):
    """PickScore: a preference-trained CLIP's scaled cosine similarity (higher is preferred)."""

    name = "pickscore"
    differentiable = True

    def __init__(self, path: str = "yuvalkirstain/PickScore_v1",
                 processor_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", local_files_only: bool = False,
                 scale: float = 1.0):
        super().__init__()
        from transformers import AutoTokenizer

        with load_errors(self.name, path):
            self.model = load_clip(path, local_files_only)
        with load_errors(self.name, processor_path):
            self.tokenizer = AutoTokenizer.from_pretrained(processor_path, local_files_only=local_files_only)
        self.scale = scale
        self.input_spec = square_spec(self.model.config.vision_config.image_size)

    def _score(self, media, prompts, metadata):
        cos = (clip_image_features(self.model, media) * clip_text_features(self.model, self.tokenizer, prompts)).sum(-1)
        return self.model.logit_scale.exp() * cos / self.scale
