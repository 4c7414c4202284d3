"""FLUX.1 Kontext (image editing) behind the Generator interface, wrapping a diffusers ``FluxKontextPipeline``.

Everything FLUX.1 [dev] does (flux.py: packed latents, embedded guidance, the grid) plus a source image per
prompt: ``with_sources`` VAE-encodes each prompt's ``metadata["image"]`` (the distribution's mode, then the VAE's
shift and scale, as the pipeline does) into ``source_latents`` in both CFG branches. ``predict`` appends the
source's packed tokens after the target's, with position ids whose first coordinate is 1, and keeps the
velocity of the target tokens only. Sources are resized to the output size (the pipeline's ``_auto_resize``
picks one of Kontext's preferred resolutions per image instead; a training batch needs one size). Without
metadata (``flowalign generate``) Kontext generates from the text alone, as the pipeline does with no image.
"""
from __future__ import annotations

import torch
from diffusers import FluxKontextPipeline

from .base import Conditioning
from .flux import FluxGenerator
from .sources import source_images


class FluxKontextGenerator(FluxGenerator):
    """FLUX.1 Kontext [dev]: FLUX.1's transformer conditioned on a source image's tokens."""
    pipeline_class = FluxKontextPipeline
    family = "FLUX.1 Kontext"
    lora_format = ("FluxKontextPipeline", "transformer")

    def __init__(self, pipe: FluxKontextPipeline, device: torch.device | str = "cpu", height: int | None = None,
                 width: int | None = None, embedded_guidance: float = 2.5, max_sequence_length: int = 512,
                 time_grid: str = "pipeline", time_shift: float = 3.0):
        """Kontext's model card samples with guidance 2.5 (the pipeline's own default is 3.5)."""
        super().__init__(pipe, device, height, width, embedded_guidance, max_sequence_length, time_grid, time_shift)

    @torch.no_grad()
    def with_sources(self, cond: Conditioning, metadata: list[dict] | None) -> Conditioning:
        if metadata is None:
            return cond
        images = source_images(cond.prompts, metadata, self.family)
        pixels = self.pipe.image_processor.preprocess(images, self.height, self.width).to(self.device)
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        negative = None if cond.negative is None else {**cond.negative, "source_latents": latents}
        return Conditioning(cond.prompts, {**cond.positive, "source_latents": latents}, negative, dict(cond.extras))

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """The target's tokens then the source's (ids with first coordinate 1); the velocity of the target's."""
        if "source_latents" not in embeds:
            return super().predict(x, sigma, embeds)
        pipe, dtype = self.pipe, self.pipe.transformer.dtype
        b, c, h, w = x.shape
        source = embeds["source_latents"].to(dtype)
        tokens = torch.cat([pipe._pack_latents(x.to(dtype), b, c, h, w),
                            pipe._pack_latents(source, b, c, *source.shape[-2:])], dim=1)
        target_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, dtype)
        source_ids = pipe._prepare_latent_image_ids(b, source.shape[-2] // 2, source.shape[-1] // 2, x.device, dtype)
        source_ids[..., 0] = 1
        out = self._transformer_pass(tokens, torch.cat([target_ids, source_ids]), sigma, embeds)
        return pipe._unpack_latents(out[:, :target_ids.shape[0]], self.height, self.width,
                                    pipe.vae_scale_factor).float()
