"""DINOv3 ViT image embeddings (transformers' ``DINOv3ViTModel``): an encoder, not a scorer, for what compares
images by their features (GARDO's diversity-aware advantages, Fréchet / Vendi / exemplar rewards, video/temporal).

Preprocessing is tensor-only (gradients reach the pixels) and follows the checkpoint's preprocessor config:
resize to its size (its interpolation, antialiased; ``size`` / ``interpolation`` override them, e.g. 256 and
bicubic, the eval transform of timm's DINOv3 that GARDO's code uses), then its mean / std.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .loading import check_local, load_errors

DEFAULT_CHECKPOINT = "facebook/dinov3-vitl16-pretrain-lvd1689m"
#: PIL resampling codes (what preprocessor configs store) -> ``F.interpolate`` modes
INTERPOLATION = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class DINOv3Encoder(nn.Module):
    """DINOv3 ViT embeddings ``[B, D]`` of images ``[B,3,H,W]`` in [0,1]: the mean of the final-normed patch
    tokens (``patch_mean``, timm's default pooling, which GARDO's code uses) or the CLS token (``cls``, the
    model's ``pooler_output``). Not normalised."""

    name = "dinov3"
    differentiable = True

    def __init__(self, path: str = DEFAULT_CHECKPOINT, local_files_only: bool = False,
                 pooling: Literal["patch_mean", "cls"] = "patch_mean", size: int | None = None,
                 interpolation: Literal["nearest", "bilinear", "bicubic"] | None = None):
        super().__init__()
        if pooling not in ("patch_mean", "cls"):
            raise ValueError(f"dinov3: pooling must be 'patch_mean' or 'cls', got {pooling!r}")
        if interpolation not in (None, *INTERPOLATION.values()):
            raise ValueError(f"dinov3: interpolation must be nearest, bilinear or bicubic, got {interpolation!r}")
        self.pooling = pooling
        with load_errors(self.name, path):
            self.model, processor = load_dinov3(path, local_files_only)
            self.size, self.interpolation, mean, std = processor_settings(processor)
        self.size = (size, size) if size else self.size
        self.interpolation = interpolation or self.interpolation
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        # what precedes the patch tokens in the sequence: CLS and the register tokens
        self.prefix_tokens = 1 + self.model.config.num_register_tokens

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] -> the model's input: resized to the processor's size, normalised."""
        images = images.to(self.mean.dtype)
        if tuple(images.shape[-2:]) != self.size:
            smooth = {"align_corners": False, "antialias": True} if self.interpolation != "nearest" else {}
            images = F.interpolate(images, size=self.size, mode=self.interpolation, **smooth)
        return (images - self.mean) / self.std

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, D]`` (see the class docstring)."""
        tokens = self.model(pixel_values=self.preprocess(images)).last_hidden_state
        return tokens[:, 0] if self.pooling == "cls" else tokens[:, self.prefix_tokens:].mean(dim=1)


def load_dinov3(path: str, local_files_only: bool):
    """A frozen ``DINOv3ViTModel`` (float32, CPU) and its image processor, from a hub id or a folder."""
    from transformers import AutoConfig, AutoImageProcessor, DINOv3ViTModel

    check_local(path)
    config = AutoConfig.from_pretrained(path, local_files_only=local_files_only)
    if config.model_type != "dinov3_vit":
        raise ValueError(f"expected a DINOv3 ViT checkpoint (model_type dinov3_vit), got {config.model_type}")
    model = DINOv3ViTModel.from_pretrained(path, config=config, local_files_only=local_files_only,
                                           dtype=torch.float32)
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=local_files_only)
    return model.eval().requires_grad_(False), processor


def processor_settings(processor) -> tuple[tuple[int, int], str, torch.Tensor, torch.Tensor]:
    """``(height, width)``, the interpolation mode, mean and std (identity when it does not normalise)."""
    size = processor.size
    height, width = (size.get("height"), size.get("width")) if isinstance(size, dict) else (size.height, size.width)
    if not (height and width and processor.do_resize):
        raise ValueError(f"expected a preprocessor config that resizes to a height and width, got size {size}")
    resample = getattr(processor.resample, "value", processor.resample)  # a PIL code or a torchvision mode
    mode = resample if resample in INTERPOLATION.values() else INTERPOLATION.get(resample)
    if mode is None:
        raise ValueError(f"preprocessor resample {resample}: expected nearest, bilinear or bicubic")
    normalize = processor.do_normalize
    mean = torch.tensor(processor.image_mean if normalize else (0.0, 0.0, 0.0), dtype=torch.float32)
    std = torch.tensor(processor.image_std if normalize else (1.0, 1.0, 1.0), dtype=torch.float32)
    return (int(height), int(width)), mode, mean, std
