"""Train the toy pairwise preference model on attribute-derived preferences (Bradley-Terry loss)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..rewards.toy.attributes import CenteredReward, InkReward
from ..rewards.toy.preference import PreferenceNet
from .data import augment, load_digits


def vary(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Digits made bolder or thinner (grey dilation / erosion) and shifted, so the attributes vary."""
    dilated = F.max_pool2d(images, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-images, 3, stride=1, padding=1)
    pick = torch.randint(0, 3, (images.shape[0], 1, 1, 1), generator=generator)
    varied = torch.where(pick == 0, dilated, torch.where(pick == 1, eroded, images))
    return augment(varied, generator, max_shift=2)


def preference_target(images: torch.Tensor) -> torch.Tensor:
    """The hidden utility the judge learns: mean ink plus centring (both on [0, 1] RGB images)."""
    rgb = ((images + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)
    return InkReward().score(rgb) + CenteredReward().score(rgb)


def pairwise_accuracy(model: PreferenceNet, images: torch.Tensor, generator: torch.Generator) -> float:
    a, b = vary(images, generator), vary(images, generator)
    with torch.no_grad():
        predicted = model(a) > model(b)
    return (predicted == (preference_target(a) > preference_target(b))).float().mean().item()


def train_preference(out_dir: str | Path, steps: int = 800, batch_size: int = 128, seed: int = 0) -> float:
    """Train; save; return the held-out pairwise accuracy (the judge agrees with the hidden utility)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, _ = load_digits("train")
    model = PreferenceNet()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in tqdm(range(steps), desc="toy preference", mininterval=5):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        a, b = vary(images[idx], gen), vary(images[idx], gen)
        label = (preference_target(a) > preference_target(b)).float()
        loss = F.binary_cross_entropy_with_logits(model(a) - model(b), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval().save_pretrained(out_dir)
    return pairwise_accuracy(model, load_digits("test")[0], torch.Generator().manual_seed(seed + 1))
