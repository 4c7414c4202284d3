"""Joint audio + video media (LTX-2's clips with their soundtracks), and the helpers that treat every kind of decoded
media alike: join batches, pick the part a reward scores, the pictures to draw."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import RewardError


@dataclass(frozen=True)
class AudioVideo:
    """A batch of clips and their soundtracks: ``video`` ``[B,F,3,H,W]`` in [0,1], ``audio`` ``[B,C,L]`` in [-1,1] at
    ``sample_rate`` Hz. Indexing, ``len``, ``to`` and friends act on the batch of both, as on a tensor."""

    video: torch.Tensor
    audio: torch.Tensor
    sample_rate: int

    def __post_init__(self):
        if self.video.ndim != 5 or self.audio.ndim != 3 or self.video.shape[0] != self.audio.shape[0]:
            raise RewardError(f"audio+video media: expected video [B,F,3,H,W] and audio [B,C,L] of one batch size, "
                              f"got {tuple(self.video.shape)} and {tuple(self.audio.shape)}")

    def __len__(self) -> int:
        return self.video.shape[0]

    def __getitem__(self, index) -> "AudioVideo":
        if isinstance(index, int):  # keep the batch dimension, as a reward's chunks do
            index = slice(index, index + 1)
        return self.map(lambda t: t[index])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "AudioVideo":
        """``fn`` applied to the video and the audio."""
        return AudioVideo(fn(self.video), fn(self.audio), self.sample_rate)

    @property
    def device(self) -> torch.device:
        return self.video.device

    @property
    def dtype(self) -> torch.dtype:
        return self.video.dtype

    @property
    def requires_grad(self) -> bool:
        return self.video.requires_grad or self.audio.requires_grad

    def to(self, *args, **kwargs) -> "AudioVideo":
        return self.map(lambda t: t.to(*args, **kwargs))

    def float(self) -> "AudioVideo":
        return self.map(torch.Tensor.float)

    def detach(self) -> "AudioVideo":
        return self.map(torch.Tensor.detach)

    def cpu(self) -> "AudioVideo":
        return self.map(torch.Tensor.cpu)

    def contiguous(self) -> "AudioVideo":
        return self.map(torch.Tensor.contiguous)


Media = torch.Tensor | AudioVideo


def cat_media(parts: list[Media]) -> Media:
    """Batches joined: ``torch.cat`` for tensors, part by part for audio+video media."""
    if parts and isinstance(parts[0], AudioVideo):
        return AudioVideo(torch.cat([p.video for p in parts]), torch.cat([p.audio for p in parts]),
                          parts[0].sample_rate)
    return torch.cat(parts)


def media_part(media: Media, modality: str, name: str = "reward") -> Media:
    """What a reward of ``modality`` scores in ``media``: the video or the audio of audio+video media (both for an
    ``audio_video`` reward); other media as they are (the reward's own check says if they do not fit)."""
    if not isinstance(media, AudioVideo) or modality == "audio_video":
        return media
    if modality == "video":
        return media.video
    if modality == "audio":
        return media.audio
    raise RewardError(f"reward {name}: a {modality} reward cannot score audio+video media; use a video, audio or "
                      f"audio_video reward")


def pictures(media: Media) -> torch.Tensor:
    """The visual part of ``media`` (the clips of audio+video media), for grids, diversity and distances."""
    return media.video if isinstance(media, AudioVideo) else media
