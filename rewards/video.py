"""Video rewards built from image rewards: per-segment frame scores (InstructVideo) and temporal consistency.

Both take video ``[B,F,3,H,W]`` in [0,1] and are differentiable when what they build on is.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from .base import InputSpec, Reward


def segment_bounds(num_frames: int, segments: int) -> list[tuple[int, int]]:
    """``segments`` contiguous, near-equal ``[start, end)`` ranges covering the frames (fewer if F < S)."""
    s = max(1, min(segments, num_frames))
    edges = [(i * num_frames) // s for i in range(s + 1)]
    return list(zip(edges[:-1], edges[1:]))


def attenuation_weights(indices: list[int], num_frames: int, tar_lambda: float) -> torch.Tensor:
    """InstructVideo's temporal attenuation ``exp(-λ·|idx - F/2|)``: frames near the middle count most."""
    return torch.tensor([math.exp(-tar_lambda * abs(i - num_frames / 2)) for i in indices])


class FrameAggregatedReward(Reward):
    """An image reward on one frame per segment, averaged with temporal-attenuation weights (InstructVideo).

    ``sampler="tsn"`` picks a random frame in each segment (from a generator seeded once, so a run is
    reproducible); ``"uniform"`` picks each segment's middle frame. ``tar_lambda=0`` weighs frames equally."""

    name = "video/frames"
    modality = "video"
    input_spec = InputSpec(range=(0.0, 1.0), layout="BFCHW")

    def __init__(self, image_reward: str | Reward = "toy/classifier", segments: int = 4,
                 sampler: Literal["tsn", "uniform"] = "tsn", tar_lambda: float = 1.0, seed: int = 0,
                 **image_reward_kwargs):
        super().__init__()
        if sampler not in ("tsn", "uniform"):
            raise ValueError(f"video/frames: sampler must be 'tsn' or 'uniform', got {sampler!r}")
        if segments < 1:
            raise ValueError(f"video/frames: segments must be >= 1, got {segments}")
        if isinstance(image_reward, str):
            from .registry import load

            image_reward = load(image_reward, **image_reward_kwargs)
        self.image_reward = image_reward
        self.differentiable = image_reward.differentiable
        self.segments, self.sampler, self.tar_lambda = segments, sampler, tar_lambda
        self.generator = torch.Generator().manual_seed(seed)

    def frame_indices(self, num_frames: int) -> list[int]:
        """One frame per segment: random (TSN, advances the generator) or the segment's middle."""
        bounds = segment_bounds(num_frames, self.segments)
        if self.sampler == "uniform":
            return [a + (b - a) // 2 for a, b in bounds]
        draws = torch.rand(len(bounds), generator=self.generator)
        return [a + min(int(u * (b - a)), b - a - 1) for u, (a, b) in zip(draws.tolist(), bounds)]

    def _score(self, media, prompts, metadata):
        b, f = media.shape[:2]
        idx = self.frame_indices(f)
        frames = media[:, idx].flatten(0, 1)
        scores = self.image_reward.score(frames, [p for p in prompts for _ in idx],
                                         [m for m in metadata for _ in idx]).view(b, len(idx))
        w = attenuation_weights(idx, f, self.tar_lambda).to(scores)
        return (scores * w).sum(1) / w.sum()


class TemporalConsistencyReward(Reward):
    """Mean cosine similarity of consecutive frames' features: raw pixels, or an image encoder's embeddings
    (a reward with ``embed_images``, e.g. "toy/clipscore"). 1 for a static video."""

    name = "video/temporal"
    modality = "video"
    differentiable = True
    input_spec = InputSpec(range=(0.0, 1.0), layout="BFCHW")

    def __init__(self, encoder: str | Reward = "pixels", **encoder_kwargs):
        super().__init__()
        self.encoder = None
        if encoder != "pixels":
            if isinstance(encoder, str):
                from .registry import load

                encoder = load(encoder, **encoder_kwargs)
            if not hasattr(encoder, "embed_images"):
                raise ValueError(f"video/temporal: encoder {type(encoder).__name__} has no embed_images")
            self.encoder = encoder
            self.differentiable = bool(getattr(encoder, "differentiable", False))

    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``[N,3,H,W]`` -> features ``[N,D]``."""
        return frames.flatten(1) if self.encoder is None else self.encoder.embed_images(frames)

    def _score(self, media, prompts, metadata):
        b, f = media.shape[:2]
        if f < 2:
            return torch.ones(b, device=media.device, dtype=media.dtype)
        feats = self.features(media.flatten(0, 1)).view(b, f, -1)
        return F.cosine_similarity(feats[:, 1:], feats[:, :-1], dim=-1).mean(1)
