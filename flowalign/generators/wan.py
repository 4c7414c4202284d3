"""Wan 2.1 / 2.2 text-to-video behind the Generator interface, wrapping a diffusers ``WanPipeline``.

Wan is a rectified-flow model: the transformer's output (at timestep σ·1000) is already the velocity
``ε - x0``. Latents are ``[C, F', H', W']`` with F' = (F-1)/4 + 1 and H', W' = H/8, W/8; ``decode`` undoes the
VAE's per-channel ``latents_mean`` / ``latents_std`` normalisation as the pipeline does and returns video
``[B, F, 3, H, W]`` in [0, 1].

Wan 2.2 A14B has two experts: ``transformer`` denoises the high-noise timesteps (t >= boundary_ratio·1000),
``transformer_2`` the rest, exactly as ``WanPipeline`` switches. One expert is trained (``train_expert``,
default ``"high"``); the other stays frozen and is called directly. ``WanPipeline.save_lora_weights``
writes only ``transformer``-prefixed LoRAs, so a LoRA trained on the low-noise expert is saved the same way
and loads with ``pipe.load_lora_weights(dir, load_into_transformer_2=True)``.
"""
from __future__ import annotations

from typing import Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from torch import nn

from ..errors import FlowalignError
from ..samplers.timegrid import from_scheduler_config
from .base import Conditioning
from .pipeline import PipelineGenerator


class WanGenerator(PipelineGenerator):
    """Wan 2.1 (one transformer) or Wan 2.2 A14B (high- and low-noise experts); UMT5 text encoder."""
    pipeline_class = WanPipeline
    family = "Wan"

    modality = "video"
    #: ``WanPipeline.__call__`` defaults.
    default_steps = 50
    default_guidance = 5.0
    #: Self- and cross-attention projections of every block (finetrainers' Wan LoRA targets).
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    lora_format = ("WanPipeline", "transformer")

    def __init__(self, pipe: WanPipeline, device: torch.device | str = "cpu", height: int = 480, width: int = 832,
                 num_frames: int = 81, max_sequence_length: int = 512,
                 train_expert: Literal["high", "low"] = "high"):
        if pipe.transformer is None or pipe.config.get("expand_timesteps", False):
            raise FlowalignError("Wan: only text-to-video pipelines with a `transformer` are supported "
                                 "(not Wan 2.2 TI2V-5B's expand_timesteps yet)")
        if train_expert not in ("high", "low") or (train_expert == "low" and pipe.transformer_2 is None):
            raise FlowalignError(f"Wan: train_expert must be 'high' or 'low' (low needs Wan 2.2's transformer_2), "
                                 f"got {train_expert!r}")
        self.pipe = pipe.to(device)
        for module in (pipe.transformer, pipe.transformer_2, pipe.vae, pipe.text_encoder):
            if module is not None:
                module.eval().requires_grad_(False)
        self._device = torch.device(device)
        spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        multiple = spatial * pipe.transformer.config.patch_size[1]
        if height % multiple or width % multiple or (num_frames - 1) % temporal:
            raise FlowalignError(f"Wan: height and width must be multiples of {multiple} and num_frames - 1 of "
                                 f"{temporal}, got {height}x{width}, {num_frames} frames")
        self.height, self.width, self.num_frames = height, width, num_frames
        self.max_sequence_length = max_sequence_length
        self.train_expert = train_expert
        self.num_train_timesteps = pipe.scheduler.config.num_train_timesteps
        ratio = pipe.config.get("boundary_ratio")
        self.boundary = None if ratio is None or pipe.transformer_2 is None else ratio * self.num_train_timesteps

    @property
    def latent_shape(self) -> tuple[int, ...]:
        spatial, temporal = self.pipe.vae_scale_factor_spatial, self.pipe.vae_scale_factor_temporal
        return (self.pipe.transformer.config.in_channels, (self.num_frames - 1) // temporal + 1,
                self.height // spatial, self.width // spatial)

    @property
    def trainable_module(self) -> nn.Module:
        """The expert fine-tuning changes: ``transformer`` (high noise; Wan 2.1's only one) or ``transformer_2``."""
        return self.pipe.transformer_2 if self.train_expert == "low" else self.pipe.transformer

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompt: str | list[str] | None = "") -> Conditioning:
        """UMT5 embeddings, zero-padded to ``max_sequence_length``, as ``WanPipeline.encode_prompt`` builds them."""
        prompts = list(prompts)
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompts)
        embeds, neg_embeds = self.pipe.encode_prompt(
            prompt=prompts, negative_prompt=negative_prompt, do_classifier_free_guidance=negative_prompt is not None,
            max_sequence_length=self.max_sequence_length, device=self.device)
        negative = None if negative_prompt is None else {"prompt_embeds": neg_embeds}
        return Conditioning(prompts, {"prompt_embeds": embeds}, negative)

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """The velocity at timesteps σ·1000; with two experts, each sample goes to the expert used at its t."""
        timestep = sigma.float() * self.num_train_timesteps
        if self.boundary is None:
            return self._run(self._expert(high=True), x, timestep, embeds["prompt_embeds"])
        high = timestep >= self.boundary
        out = torch.empty(x.shape, device=x.device, dtype=torch.float32)
        for mask, is_high in ((high, True), (~high, False)):
            if mask.any():  # one host sync per call, only for two-expert models
                out[mask] = self._run(self._expert(is_high), x[mask], timestep[mask], embeds["prompt_embeds"][mask])
        return out

    def _expert(self, high: bool) -> nn.Module:
        """The high- or low-noise expert; the trained one goes through ``forward_module`` (its DDP/FSDP wrapper)."""
        module = self.pipe.transformer if high else self.pipe.transformer_2
        return self.forward_module if module is self.trainable_module else module

    def _run(self, module: nn.Module, x: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        dtype = self.pipe.transformer.dtype
        out = module(hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=embeds.to(dtype),
                     return_dict=False)[0]
        return out.float()

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The pipeline scheduler's noise levels (its shift / flow_shift), ``num_steps + 1`` values ending at 0."""
        scheduler = self.pipe.scheduler
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            return from_scheduler_config(scheduler.config, num_steps).to(self.device)
        if not scheduler.config.get("use_flow_sigmas", False):  # e.g. UniPCMultistepScheduler(use_flow_sigmas=True)
            raise FlowalignError(f"Wan: scheduler {type(scheduler).__name__} does not use flow sigmas")
        fresh = type(scheduler).from_config(scheduler.config)
        fresh.set_timesteps(num_steps)
        return fresh.sigmas.float().to(self.device)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> de-normalised -> VAE -> video ``[B, F, 3, H, W]`` in [0, 1], float32."""
        vae = self.pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(x.device, vae.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(x.device, vae.dtype)
        video = vae.decode(x.to(vae.dtype) / inv_std + mean, return_dict=False)[0]  # [B, 3, F, H, W] in [-1, 1]
        return (video.float().permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1)
