"""LAION aesthetic predictor v2: an MLP on the L2-normalised CLIP ViT-L/14 image embedding (scores ~1-10).

The MLP has exactly the layers of ``sac+logos+ava1-l14-linearMSE.pth`` (improved-aesthetic-predictor):
Linear(768,1024), Dropout(0.2), Linear(1024,128), Dropout(0.2), Linear(128,64), Dropout(0.1), Linear(64,16),
Linear(16,1), no activations; its state-dict keys are ``layers.{0,2,4,6,7}.{weight,bias}``. ImageReward's
head is the same stack. The prompt is not used.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Reward
from .loading import clip_image_features, load_clip, load_errors, load_state_dict_file, resolve_file, square_spec

MLP_FILE = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticMLP(nn.Module):
    """The Linear/Dropout stack (no nonlinearity) of the LAION aesthetic predictor and ImageReward."""

    def __init__(self, in_features: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LaionAesthetic(Reward):
    """Aesthetic score of an image from CLIP ViT-L/14 (``clip_path``) and the MLP file at ``path``.

    ``path``: the MLP file (.pth or .safetensors), a folder holding ``sac+logos+ava1-l14-linearMSE.pth``, or a
    hub repo with that file. The MLP's input width follows the CLIP's ``projection_dim`` (768 for ViT-L/14)."""

    name = "aesthetic"
    differentiable = True

    def __init__(self, path: str, local_files_only: bool = False, clip_path: str = "openai/clip-vit-large-patch14"):
        super().__init__()
        with load_errors(self.name, clip_path):
            self.clip = load_clip(clip_path, local_files_only)
        with load_errors(self.name, path):
            state = load_state_dict_file(resolve_file(path, MLP_FILE, local_files_only))
            self.mlp = AestheticMLP(self.clip.config.projection_dim)
            self.mlp.load_state_dict(state)
        self.mlp.eval().requires_grad_(False)
        self.input_spec = square_spec(self.clip.config.vision_config.image_size)

    def _score(self, media, prompts, metadata):
        return self.mlp(clip_image_features(self.clip, media)).squeeze(-1)
