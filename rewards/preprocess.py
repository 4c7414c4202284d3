"""Tensor-only preprocessing, so gradients reach the pixels (no PIL, no numpy)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """RGB ``[B,3,H,W]`` in [0,1] -> resize (bicubic, shortest side) -> centre crop -> normalise."""
    h, w = images.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        new = (max(size, round(h * scale)), max(size, round(w * scale)))
        images = F.interpolate(images, size=new, mode="bicubic", align_corners=False, antialias=scale < 1)
        top, left = (new[0] - size) // 2, (new[1] - size) // 2
        images = images[..., top:top + size, left:left + size]
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean_t) / std_t
