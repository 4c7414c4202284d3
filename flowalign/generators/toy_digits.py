"""The toy digits generator: a tiny SD3 transformer with a tiny text encoder, in 16x16 pixel space."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import nn

from ..errors import FlowalignError
from ..samplers.timegrid import from_scheduler_config
from ..toy.text_encoder import ToyTextEncoder
from .base import Conditioning, Generator
from .loading import default_device

SHIPPED = Path(__file__).resolve().parent.parent / "toy" / "weights" / "digits"


def load_toy_folder(path: str | Path, transformer_class: type, world: str, dtype: torch.dtype) -> tuple:
    """(transformer, text encoder, scheduler) from a toy model folder; one line naming a missing part."""
    path = Path(path)
    for part in ("transformer", "text_encoder", "scheduler"):
        if not (path / part).is_dir():
            raise FlowalignError(f"toy {world} model {path}: missing folder '{part}/' "
                                 "(expected the output of `flowalign toy build`)")
    return (transformer_class.from_pretrained(path / "transformer", torch_dtype=dtype),
            ToyTextEncoder.from_pretrained(path / "text_encoder"),
            FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler"))


class ToyDigitsGenerator(Generator):
    """Rectified flow on scikit-learn's digits; the "latent" is the image itself in [-1,1] (ink = +1)."""

    modality = "image"
    toy_world = "digits"  # the trainer's prompts and held-out evaluation prompts come from this world
    default_steps = 20
    default_guidance = 3.0
    lora_target_modules = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                           "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]

    def __init__(self, transformer: SD3Transformer2DModel, text_encoder: ToyTextEncoder,
                 scheduler: FlowMatchEulerDiscreteScheduler, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        if transformer.dtype != dtype:
            transformer = transformer.to(dtype)
        self.transformer = transformer.to(device).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        self.scheduler = scheduler
        self._device, self._dtype = torch.device(device), dtype

    @classmethod
    def from_pretrained(cls, path: str | Path = SHIPPED, device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32) -> "ToyDigitsGenerator":
        """Load a folder written by ``flowalign toy build`` (``transformer/``, ``text_encoder/``, ``scheduler/``)."""
        parts = load_toy_folder(path, SD3Transformer2DModel, cls.toy_world, dtype)
        return cls(*parts, default_device(device), dtype)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def latent_shape(self) -> tuple[int, ...]:
        size = self.transformer.config.sample_size
        return (self.transformer.config.in_channels, size, size)

    @property
    def trainable_module(self) -> nn.Module:
        return self.transformer

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompt: str | list[str] | None = "") -> Conditioning:
        embeds, pooled = self.text_encoder(list(prompts))
        negative = None
        if negative_prompt is not None:
            negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            neg_embeds, neg_pooled = self.text_encoder(negs)
            negative = {"prompt_embeds": neg_embeds, "pooled": neg_pooled}
        return Conditioning(list(prompts), {"prompt_embeds": embeds, "pooled": pooled}, negative)

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.transformer.dtype
        out = self.forward_module(hidden_states=x.to(dtype), timestep=sigma * self.scheduler.config.num_train_timesteps,
                               encoder_hidden_states=embeds["prompt_embeds"].to(dtype),
                               pooled_projections=embeds["pooled"].to(dtype), return_dict=False)[0]
        return out.float()

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return from_scheduler_config(self.scheduler.config, num_steps).to(self.device)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1,1] -> RGB images in [0,1] (grey digits, white ink on black)."""
        return ((x.float() + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)
