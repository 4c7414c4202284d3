"""The digits data: scikit-learn's 8x8 handwritten digits, upscaled to 16x16 in [-1, 1]."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16


def load_digits(split: str = "train", seed: int = 0, test_fraction: float = 0.2,
                size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N,1,size,size]`` in [-1,1] (ink is +1) and labels ``[N]``; a fixed, stratified train/test split.
    ``size=8`` keeps scikit-learn's native resolution (the moving-digits video uses it)."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    data = sk_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N,1,8,8] in [0,1]
    labels = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(labels)), test_size=test_fraction, random_state=seed,
                                           stratify=labels.numpy())
    idx = torch.tensor(idx_train if split == "train" else idx_test)
    images = images[idx]
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, labels[idx]


def augment(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random integer translations (background-padded), so position and size vary a little."""
    n = images.shape[0]
    pad = F.pad(images, [max_shift] * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    size = images.shape[-1]
    rows = (dy[:, None] + torch.arange(size)[None]).unsqueeze(-1).expand(n, size, size)
    cols = (dx[:, None] + torch.arange(size)[None]).unsqueeze(1).expand(n, size, size)
    batch = torch.arange(n)[:, None, None].expand(n, size, size)
    return pad[batch, 0, rows, cols].unsqueeze(1)
