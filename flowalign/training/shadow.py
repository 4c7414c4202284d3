"""A second copy of the trainable weights: DiffusionNFT's old policy, AWM's and DGPO's EMA references.

Written here rather than with diffusers' ``EMAModel``: these copies follow each paper's own decay schedule
(``d = min(rate·(step - flat), max)``, a hard copy below ``flat``), and the copy is swapped in for sampling or
for a forward pass, not only for evaluation.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class ShadowWeights:
    """A copy of ``params`` (same devices and dtypes) that can be swapped in and blended toward them."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = list(params)
        self.tensors = [p.detach().clone() for p in self.params]

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block the parameters hold the copy; afterwards their own values again."""
        own = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, t in zip(self.params, self.tensors):
                p.copy_(t)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(self.params, own):
                    p.copy_(t)

    @torch.no_grad()
    def blend(self, decay: float) -> None:
        """``copy ← decay·copy + (1 - decay)·params`` (decay 0: a hard copy)."""
        for t, p in zip(self.tensors, self.params):
            t.mul_(decay).add_(p.detach().to(t.dtype), alpha=1.0 - decay)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The copy as checkpoint weights, ``{prefix}{i}``."""
        return {f"{prefix}{i}": t.detach().clone() for i, t in enumerate(self.tensors)}

    def load(self, weights: dict[str, torch.Tensor], prefix: str) -> None:
        """Restore what ``state`` saved (one line naming the first missing weight)."""
        for i, t in enumerate(self.tensors):
            key = f"{prefix}{i}"
            if key not in weights:
                raise KeyError(f"checkpoint has no '{key}' ({len(self.tensors)} weights expected)")
            t.copy_(weights[key])


def ramp_decay(step: int, rate: float, maximum: float, flat: int = 0) -> float:
    """DiffusionNFT / AWM / DGPO's decay after ``step`` optimizer steps: 0 before ``flat``, then
    ``min(rate·(step - flat), maximum)``."""
    return 0.0 if step < flat else min(rate * (step - flat), maximum)
