"""The toy video generator: a tiny Wan transformer with the toy text encoder, moving digits in 4x16x16 pixel space."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from torch import nn

from ..samplers.timegrid import from_scheduler_config
from ..toy.text_encoder import ToyTextEncoder
from .base import Conditioning, Generator
from .loading import default_device
from .toy_digits import load_toy_folder

SHIPPED = Path(__file__).resolve().parent.parent / "toy" / "weights" / "video"


def position_channels(x: torch.Tensor) -> torch.Tensor:
    """Latents ``[B,C,F,H,W]`` -> ``[B,C+3,F,H,W]``: + fixed (t, y, x) coordinate maps in [-1,1].

    Wan's 3D RoPE is relative, so a small model cannot tell the first frame or the left edge; the moving
    digits start at an edge that depends on the prompt. Like Wan's image-to-video model, which concatenates
    its condition channels to the latents, the toy concatenates the coordinates."""
    b, _, f, h, w = x.shape
    axes = [torch.linspace(-1, 1, n, device=x.device, dtype=x.dtype) for n in (f, h, w)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # [3,F,H,W]
    return torch.cat([x, grid.expand(b, -1, -1, -1, -1)], dim=1)


class ToyVideoGenerator(Generator):
    """Rectified flow on moving digits; the "latent" is the clip itself, ``[1,F,H,W]`` in [-1,1] (ink = +1);
    the transformer also reads three coordinate channels (``position_channels``).

    Wan's 3D RoPE makes the transformer shape-agnostic, so ``num_frames`` / ``size`` are sampling choices;
    the shipped model is trained at 4 frames of 16x16."""

    modality = "video"
    default_steps = 20
    default_guidance = 3.0
    lora_target_modules = [f"{attn}.{proj}" for attn in ("attn1", "attn2")
                           for proj in ("to_q", "to_k", "to_v", "to_out.0")]
    lora_format = ("WanPipeline", "transformer")
    #: Which toy prompt set GRPO trains and evaluates on (flowalign.training.prompts.TOY_PROMPTS).
    toy_world = "video"

    def __init__(self, transformer: WanTransformer3DModel, text_encoder: ToyTextEncoder,
                 scheduler: FlowMatchEulerDiscreteScheduler, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, num_frames: int = 4, size: int = 16):
        if transformer.dtype != dtype:
            transformer = transformer.to(dtype)
        self.transformer = transformer.to(device).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        self.scheduler = scheduler
        self.num_frames, self.size = num_frames, size
        self._device, self._dtype = torch.device(device), dtype

    @classmethod
    def from_pretrained(cls, path: str | Path = SHIPPED, device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32, num_frames: int = 4, size: int = 16) -> "ToyVideoGenerator":
        """Load a folder written by ``flowalign toy build`` (``transformer/``, ``text_encoder/``, ``scheduler/``)."""
        parts = load_toy_folder(path, WanTransformer3DModel, cls.toy_world, dtype)
        return cls(*parts, default_device(device), dtype, num_frames, size)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.transformer.config.out_channels, self.num_frames, self.size, self.size)

    @property
    def trainable_module(self) -> nn.Module:
        return self.transformer

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompt: str | list[str] | None = "") -> Conditioning:
        embeds, _ = self.text_encoder(list(prompts))
        negative = None
        if negative_prompt is not None:
            negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            negative = {"prompt_embeds": self.text_encoder(negs)[0]}
        return Conditioning(list(prompts), {"prompt_embeds": embeds}, negative)

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.transformer.dtype
        out = self.forward_module(hidden_states=position_channels(x.to(dtype)),
                                  timestep=sigma * self.scheduler.config.num_train_timesteps,
                                  encoder_hidden_states=embeds["prompt_embeds"].to(dtype), return_dict=False)[0]
        return out.float()

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return from_scheduler_config(self.scheduler.config, num_steps).to(self.device)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents ``[B,1,F,H,W]`` in [-1,1] -> RGB video ``[B,F,3,H,W]`` in [0,1] (white ink on black)."""
        return ((x.float() + 1) / 2).clamp(0, 1).transpose(1, 2).expand(-1, -1, 3, -1, -1)
