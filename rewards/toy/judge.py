"""A second digit judge that no training run optimises: a different model on different inputs from the toy
classifier's, so a gain it confirms is not the classifier being fooled.

The classifier is a CNN on 16x16 images trained on the 80% split of scikit-learn's digits. The judge is a
multinomial logistic regression on the native 8x8 resolution (each image average-pooled 2x2), fitted on all
1,797 digits with scikit-learn at first use (deterministic, about a second; nothing to ship). It is not
differentiable: it judges, it is never trained against.
"""
from __future__ import annotations

import functools

import torch

from ..base import InputSpec, Reward
from .digits import target_digits


@functools.lru_cache(maxsize=1)
def fitted_judge() -> tuple[torch.Tensor, torch.Tensor]:
    """The judge's weights ``[10, 64]`` and bias ``[10]``, fitted on scikit-learn's digits (pixels in [0, 1])."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    data = load_digits()
    model = LogisticRegression(C=0.5, max_iter=2000).fit(data.data / 16.0, data.target)
    return torch.tensor(model.coef_, dtype=torch.float32), torch.tensor(model.intercept_, dtype=torch.float32)


def judge_logits(images: torch.Tensor) -> torch.Tensor:
    """RGB ``[B,3,16,16]`` in [0,1] -> logits over the ten digits."""
    grey = images.float().mean(dim=1, keepdim=True)
    if grey.shape[-2:] != (16, 16):
        grey = torch.nn.functional.interpolate(grey, size=(16, 16), mode="bilinear", antialias=True)
    pixels = torch.nn.functional.avg_pool2d(grey, 2).flatten(1)  # [B, 64]
    weight, bias = fitted_judge()
    return pixels @ weight.to(pixels.device).T + bias.to(pixels.device)


class JudgeDigitMatch(Reward):
    """1 when the second judge reads the prompted digit, else 0 (accuracy; a metric, not a training reward)."""

    name = "toy/judge_digit"
    differentiable = False
    input_spec = InputSpec(range=(0.0, 1.0), layout="BCHW", size=(16, 16))

    def _score(self, media, prompts, metadata):
        targets = torch.tensor(target_digits(prompts, metadata), device=media.device)
        return (judge_logits(media).argmax(-1) == targets).float()
