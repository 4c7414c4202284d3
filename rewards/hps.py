"""Human Preference Score v2 / v2.1 (Wu et al.): ``cos(image, text)`` of an open_clip ViT-H-14 fine-tuned on HPD.

The checkpoint (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``, hub repo ``xswu/HPSv2``) holds a
``state_dict`` with upstream open_clip's key names, so it loads into ``open_clip.create_model("ViT-H-14",
pretrained=None)``; the ``hpsv2`` package is not needed. Score = ``diag(img_f @ txt_f.T)`` of L2-normalised
features, no logit scale (~0.2-0.35). Preprocessing is HPS's ``ResizeMaxSize``: long side resized, zero padded
to a square, then CLIP normalisation; all tensor ops, so gradients reach the pixels. v2 and v2.1 scores differ
in scale and are not comparable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Reward
from .loading import load_errors, load_state_dict_file, resolve_file, square_spec
from .preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess


def resize_max_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the long side is ``size`` (bicubic), then zero-pad, centred, to ``size`` x ``size``."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=scale < 1)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


class HPSv2(Reward):
    """HPS v2.0. ``path``: the checkpoint file, a folder holding it, or a hub repo (default ``xswu/HPSv2``).
    ``model``: the open_clip architecture name (ViT-H-14; tests register a tiny config)."""

    name = "hpsv2"
    differentiable = True
    filename = "HPS_v2_compressed.pt"

    def __init__(self, path: str = "xswu/HPSv2", local_files_only: bool = False, model: str = "ViT-H-14"):
        super().__init__()
        import open_clip

        with load_errors(self.name, path):
            state = load_state_dict_file(resolve_file(path, self.filename, local_files_only))
            state = state.get("state_dict", state)
            self.model = open_clip.create_model(model, pretrained=None)
            self.model.load_state_dict(state)
            self.tokenizer = open_clip.get_tokenizer(model)
        self.model.eval().requires_grad_(False)
        cfg = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        self.mean, self.std = tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))
        size = self.model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size
        self.input_spec = square_spec(self.image_size)

    def _score(self, media, prompts, metadata):
        pixels = clip_preprocess(resize_max_pad(media, self.image_size), self.image_size, self.mean, self.std)
        image = F.normalize(self.model.encode_image(pixels), dim=-1)
        tokens = self.tokenizer(prompts).to(media.device)
        text = F.normalize(self.model.encode_text(tokens), dim=-1)
        return (image * text).sum(-1)


class HPSv21(HPSv2):
    """HPS v2.1: the same model and score, the v2.1 checkpoint (``HPS_v2.1_compressed.pt``)."""

    name = "hpsv2.1"
    filename = "HPS_v2.1_compressed.pt"
