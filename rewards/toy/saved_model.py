"""The save/load pair the toy models share: ``config.json`` (constructor arguments) + ``model.safetensors``."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn


class SavedModel(nn.Module):
    """A module whose ``self.config`` holds its constructor arguments, saved as JSON beside safetensors weights."""

    config: dict

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, directory / "model.safetensors")

    @classmethod
    def from_pretrained(cls, directory: str | Path):
        directory = Path(directory)
        model = cls(**json.loads((directory / "config.json").read_text()))
        model.load_state_dict(load_file(directory / "model.safetensors"))
        return model.eval()
