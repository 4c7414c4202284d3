"""Train the toy digit classifier that the classifier rewards use."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..rewards.toy.classifier import DigitClassifier
from .data import augment, load_digits


def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(images).argmax(-1) == labels).float().mean().item()


def train_classifier(out_dir: str | Path, steps: int = 1500, batch_size: int = 128, seed: int = 0) -> float:
    """Train with shift and noise augmentation; save; return held-out accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_digits("train")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in tqdm(range(steps), desc="toy classifier", mininterval=5):
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen)
        x = augment(images[idx], gen) + 0.1 * torch.randn((batch_size, 1, 16, 16), generator=gen)
        loss = F.cross_entropy(model(x.clamp(-1, 1)), labels[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval().save_pretrained(out_dir)
    return accuracy(model, *load_digits("test"))
