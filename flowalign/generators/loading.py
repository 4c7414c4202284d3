"""Loading a diffusers pipeline for an adapter, with one-line errors when the model is not there."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..errors import FlowalignError

EXPECTED = "expected a hub id or a directory with model_index.json"


def load_pipeline(pipeline_class: type, path: str | Path, dtype: torch.dtype, local_files_only: bool,
                  family: str, **kwargs):
    """``pipeline_class.from_pretrained(path, ...)``; a FlowalignError naming ``path`` when nothing is found.

    ``family`` names the model in the message (e.g. "SD3"); ``kwargs`` go to ``from_pretrained``
    (e.g. ``safety_checker=None`` to skip loading a component)."""
    path = str(path)
    if Path(path).is_dir():
        if not (Path(path) / "model_index.json").is_file():
            raise FlowalignError(f"{family} model '{path}': no model_index.json in this directory ({EXPECTED})")
        return _from_pretrained(pipeline_class, path, dtype, local_files_only, kwargs)
    try:
        return _from_pretrained(pipeline_class, path, dtype, local_files_only, kwargs)
    except (OSError, ValueError) as err:  # not on the hub / not cached offline / not a valid repo id
        raise FlowalignError(f"{family} model '{path}': not found ({EXPECTED}; {type(err).__name__})") from None


def _from_pretrained(pipeline_class: type, path: str, dtype: torch.dtype, local_files_only: bool, kwargs: dict):
    """``torch_dtype`` works in every supported diffusers; 0.42 renames it ``dtype`` and warns, so mute that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
        return pipeline_class.from_pretrained(path, torch_dtype=dtype, local_files_only=local_files_only, **kwargs)


def default_device(device: torch.device | str | None) -> torch.device | str:
    """``device``, or this process's accelerate device (the GPU of its rank) when None."""
    if device is None:
        from accelerate import PartialState
        return PartialState().device
    return device
