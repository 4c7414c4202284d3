"""Stable Diffusion 3 / 3.5 behind the Generator interface, wrapping a diffusers ``StableDiffusion3Pipeline``."""
from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline
from torch import nn

from ..samplers.timegrid import from_scheduler_config
from .base import Conditioning
from .pipeline import PipelineGenerator


class SD3Generator(PipelineGenerator):
    """SD3(.5): MMDiT transformer, CLIP-L + CLIP-G (+ optional T5) text encoders, 16-channel VAE."""
    pipeline_class = StableDiffusion3Pipeline
    family = "SD3"

    modality = "image"
    #: ``StableDiffusion3Pipeline.__call__`` defaults (SD3.5 medium's model card uses 40 steps / 4.5).
    default_steps = 28
    default_guidance = 7.0
    #: Flow-GRPO's LoRA targets: the joint attention of every MMDiT block.
    lora_target_modules = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                           "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]

    def __init__(self, pipe: StableDiffusion3Pipeline, device: torch.device | str = "cpu",
                 height: int | None = None, width: int | None = None, max_sequence_length: int = 256):
        self.pipe = pipe.to(device)
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            if module is not None:
                module.eval().requires_grad_(False)
        self._device = torch.device(device)
        default_size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        self.height = height or default_size
        self.width = width or default_size
        self.max_sequence_length = max_sequence_length

    @property
    def latent_shape(self) -> tuple[int, ...]:
        scale = self.pipe.vae_scale_factor
        return (self.pipe.transformer.config.in_channels, self.height // scale, self.width // scale)

    @property
    def trainable_module(self) -> nn.Module:
        return self.pipe.transformer

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompt: str | list[str] | None = "") -> Conditioning:
        """CLIP-L, CLIP-G and T5 embeddings (T5 zeros when ``text_encoder_3`` is None), as the pipeline builds them."""
        prompts = list(prompts)
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompts)
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=negative_prompt is not None, negative_prompt=negative_prompt,
            max_sequence_length=self.max_sequence_length)
        negative = None
        if negative_prompt is not None:
            negative = {"prompt_embeds": neg_embeds, "pooled": neg_pooled}
        return Conditioning(prompts, {"prompt_embeds": embeds, "pooled": pooled}, negative)

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's output as is: SD3 is trained on rectified flow and already predicts ``ε - x0``."""
        transformer = self.pipe.transformer
        dtype = transformer.dtype
        timestep = sigma.float() * self.pipe.scheduler.config.num_train_timesteps
        out = self.forward_module(hidden_states=x.to(dtype), timestep=timestep,
                          encoder_hidden_states=embeds["prompt_embeds"].to(dtype),
                          pooled_projections=embeds["pooled"].to(dtype), return_dict=False)[0]
        return out.float()

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The pipeline's own schedule (shift, dynamic shifting), ``num_steps + 1`` values ending at 0."""
        return from_scheduler_config(self.pipe.scheduler.config, num_steps, self._image_seq_len()).to(self.device)

    def _image_seq_len(self) -> int:
        """Number of image tokens the transformer sees (the length dynamic shifting depends on)."""
        patch = self.pipe.transformer.config.patch_size
        _, h, w = self.latent_shape
        return (h // patch) * (w // patch)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> VAE -> RGB images ``[B,3,H,W]`` in [0,1], float32."""
        vae = self.pipe.vae
        latents = x.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
