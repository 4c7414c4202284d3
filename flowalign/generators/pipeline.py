"""The part every diffusers-pipeline adapter shares: loading (hub id or folder, the rank's device) and the
device / dtype it runs in. An adapter names its ``pipeline_class`` and ``family``; its constructor does the rest."""
from __future__ import annotations

from pathlib import Path

import torch

from .base import Generator
from .loading import default_device, load_pipeline


class PipelineGenerator(Generator):
    """A Generator wrapping one diffusers pipeline (``self.pipe``) on ``self._device``."""

    pipeline_class: type
    #: The model's name in messages ("SD3", "FLUX", ...).
    family: str = "diffusers"
    #: Extra ``from_pretrained`` arguments (e.g. ``safety_checker=None``).
    load_kwargs: dict = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None, local_files_only: bool = False, **kwargs):
        """Load a hub id or a local pipeline folder onto ``device`` (default: this process's accelerate device);
        ``kwargs`` go to the adapter's constructor (height, num_frames, ...)."""
        pipe = load_pipeline(cls.pipeline_class, path, dtype, local_files_only, cls.family, **cls.load_kwargs)
        return cls(pipe, default_device(device), **kwargs)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self.trainable_module.dtype
