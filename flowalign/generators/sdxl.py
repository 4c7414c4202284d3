"""Stable Diffusion XL behind the Generator interface, wrapping a diffusers ``StableDiffusionXLPipeline``.

The UNet, its ε/v conversion to the flow convention and the DDIM time grid are SD's (``sd.py``); SDXL adds a
second text encoder, whose pooled projection (``text_embeds``) and the size / crop ``time_ids`` condition the UNet.
"""
from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

from .base import Conditioning
from .sd import StableDiffusionGenerator, negative_prompts


class StableDiffusionXLGenerator(StableDiffusionGenerator):
    """SDXL: two CLIP text encoders, ``text_time`` added conditioning; original = target size, no crop."""

    #: ``StableDiffusionXLPipeline.__call__`` defaults.
    default_steps = 50
    default_guidance = 5.0
    lora_format = ("StableDiffusionXLPipeline", "unet")
    pipeline_class = StableDiffusionXLPipeline
    family = "SDXL"
    load_kwargs: dict = {}

    def __init__(self, pipe: StableDiffusionXLPipeline, device: torch.device | str = "cpu",
                 height: int | None = None, width: int | None = None):
        super().__init__(pipe, device, height, width)
        if pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
            pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16; the pipeline decodes in fp32 too

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompt: str | list[str] | None = "") -> Conditioning:
        """Both encoders' hidden states, the pooled embedding and the time ids, as the pipeline builds them.

        An empty negative prompt is the pipeline's own unconditional branch: zeros when
        ``force_zeros_for_empty_prompt`` (SDXL base), else the encoded "".
        """
        prompts = list(prompts)
        negatives = negative_prompts(negative_prompt, len(prompts))
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=negatives is not None,
            negative_prompt=None if negatives is None or not any(negatives) else negatives)
        time_ids = self._time_ids(len(prompts), pooled.shape[-1], embeds.dtype)
        positive = {"prompt_embeds": embeds, "text_embeds": pooled, "time_ids": time_ids}
        negative = None
        if negatives is not None:
            negative = {"prompt_embeds": neg_embeds, "text_embeds": neg_pooled, "time_ids": time_ids}
        return Conditioning(prompts, positive, negative)

    def _time_ids(self, n: int, pooled_dim: int, dtype: torch.dtype) -> torch.Tensor:
        """``(original size, crop top-left, target size)`` per sample, from the pipeline's ``_get_add_time_ids``."""
        size = (self.height, self.width)
        encoder_2 = self.pipe.text_encoder_2
        projection_dim = pooled_dim if encoder_2 is None else encoder_2.config.projection_dim
        time_ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype,
                                               text_encoder_projection_dim=projection_dim)
        return time_ids.to(self.device).repeat(n, 1)

    def _unet_kwargs(self, embeds: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
        return {"added_cond_kwargs": {"text_embeds": embeds["text_embeds"].to(dtype),
                                      "time_ids": embeds["time_ids"].to(dtype)}}

    def _vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the latent scaling, with the VAE's per-channel mean / std when its config has them."""
        config = self.pipe.vae.config
        if getattr(config, "latents_mean", None) is None or getattr(config, "latents_std", None) is None:
            return x / config.scaling_factor
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(x.device, x.dtype)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(x.device, x.dtype)
        return x * std / config.scaling_factor + mean
