"""FLUX.1 behind the Generator interface, wrapping a diffusers ``FluxPipeline``.

Latents: the interface's latent is the *unpacked* VAE grid ``[C, H/8, W/8]`` (so a seed means the same
noise as the pipeline's ``randn`` before ``_pack_latents``); ``predict`` packs it into 2x2-patch tokens
``[H/16·W/16, 4C]`` for the transformer and unpacks the velocity again. FLUX is a rectified-flow model, so
the transformer's output is already the velocity ``ε - x0``.

Guidance: FLUX.1-dev is guidance-distilled: the guidance scale is an *input* of the transformer
(``guidance_embeds``), not two passes. It is the adapter's ``embedded_guidance`` (the pipeline's
``guidance_scale``, default 3.5); the interface's ``guidance`` is real CFG (the pipeline's
``true_cfg_scale``) and stays 1.0 by default, so FLUX configs keep ``train.guidance=1``.

Time grid: ``time_grid="pipeline"`` is the pipeline's (``linspace(1, 1/N, N)`` shifted dynamically by the image
token count, about 2.2 at 720²); ``"fastvideo"`` is the grid DanceGRPO, MixGRPO, Pref-GRPO and BranchGRPO sample
FLUX on: ``linspace(1, 0, N+1)`` shifted by ``time_shift`` (3), the transformer given ``int(σ·1000)/1000``.
"""
from __future__ import annotations

import torch
from diffusers import FluxPipeline
from torch import nn

from ..errors import FlowalignError
from ..samplers.timegrid import from_scheduler_config, shifted_linspace
from .base import Conditioning
from .pipeline import PipelineGenerator


class FluxGenerator(PipelineGenerator):
    """FLUX.1 [dev] / [schnell]: MMDiT + single-stream transformer, CLIP-L (pooled) + T5 text encoders."""
    pipeline_class = FluxPipeline
    family = "FLUX"

    modality = "image"
    #: ``FluxPipeline.__call__`` defaults; guidance 1.0: no real CFG (the distilled guidance is ``embedded_guidance``).
    default_steps = 28
    default_guidance = 1.0
    #: diffusers' FLUX LoRA training script (train_dreambooth_lora_flux.py): attention and feed-forwards of the
    #: double-stream blocks; ``attn.to_{q,k,v}`` also match the single-stream blocks' attention.
    lora_target_modules = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                           "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                           "ff_context.net.0.proj", "ff_context.net.2"]
    lora_format = ("FluxPipeline", "transformer")

    def __init__(self, pipe: FluxPipeline, device: torch.device | str = "cpu", height: int | None = None,
                 width: int | None = None, embedded_guidance: float = 3.5, max_sequence_length: int = 512,
                 time_grid: str = "pipeline", time_shift: float = 3.0):
        self.pipe = pipe.to(device)
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.eval().requires_grad_(False)
        self._device = torch.device(device)
        default_size = pipe.default_sample_size * pipe.vae_scale_factor
        self.height, self.width = height or default_size, width or default_size
        multiple = pipe.vae_scale_factor * 2  # the VAE's downsampling times the 2x2 packing
        if self.height % multiple or self.width % multiple:
            raise FlowalignError(f"FLUX: height and width must be multiples of {multiple}, "
                                 f"got {self.height}x{self.width}")
        self.embedded_guidance = embedded_guidance
        self.max_sequence_length = max_sequence_length
        if time_grid not in ("pipeline", "fastvideo"):
            raise FlowalignError(f"FLUX: time_grid must be 'pipeline' or 'fastvideo', got {time_grid!r}")
        if not 0 < time_shift <= 100:
            raise FlowalignError(f"FLUX: time_shift must be in (0, 100], got {time_shift}")
        self.time_grid, self.time_shift = time_grid, float(time_shift)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The unpacked latent grid ``[C, H/s, W/s]`` (C = transformer channels / 4, the 2x2 packing)."""
        scale = self.pipe.vae_scale_factor
        return (self.pipe.transformer.config.in_channels // 4, self.height // scale, self.width // scale)

    @property
    def trainable_module(self) -> nn.Module:
        return self.pipe.transformer

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompt: str | list[str] | None = "") -> Conditioning:
        """T5 sequence embeddings and CLIP's pooled embedding, as ``FluxPipeline.encode_prompt`` builds them."""
        prompts = list(prompts)
        positive = self._encode(prompts)
        negative = None
        if negative_prompt is not None:
            negative_prompt = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
            negative = self._encode(list(negative_prompt))
        return Conditioning(prompts, positive, negative)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        # text_ids (zeros, one row per token) are not batch-first; predict rebuilds them from the sequence length.
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                    max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled": pooled}

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pack the latents, run the transformer at timestep σ (FLUX takes σ, not σ·1000) with the embedded
        guidance, unpack: the velocity ``ε - x0`` on the latent grid."""
        pipe, dtype = self.pipe, self.pipe.transformer.dtype
        b, c, h, w = x.shape
        tokens = pipe._pack_latents(x.to(dtype), b, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, dtype)
        out = self._transformer_pass(tokens, img_ids, sigma, embeds)
        return pipe._unpack_latents(out, self.height, self.width, pipe.vae_scale_factor).float()

    def _transformer_pass(self, tokens: torch.Tensor, img_ids: torch.Tensor, sigma: torch.Tensor,
                          embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """One transformer call on packed image tokens (and their position ids) with the prompt's embeddings."""
        dtype, b = self.pipe.transformer.dtype, tokens.shape[0]
        txt_ids = torch.zeros(embeds["prompt_embeds"].shape[1], 3, device=tokens.device, dtype=dtype)
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.embedded_guidance, device=tokens.device, dtype=torch.float32)
        if self.time_grid == "fastvideo":  # FastVideo passes the timestep truncated to 1/1000
            sigma = torch.floor(sigma.float() * 1000) / 1000
        return self.forward_module(hidden_states=tokens, timestep=sigma.to(dtype), guidance=guidance,
                                   pooled_projections=embeds["pooled"].to(dtype),
                                   encoder_hidden_states=embeds["prompt_embeds"].to(dtype), txt_ids=txt_ids,
                                   img_ids=img_ids, return_dict=False)[0]

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The pipeline's grid: ``linspace(1, 1/N, N)`` shifted (dynamically by the image token count), then 0;
        or with ``time_grid="fastvideo"`` the papers' ``linspace(1, 0, N+1)`` shifted by ``time_shift``."""
        if self.time_grid == "fastvideo":
            return shifted_linspace(num_steps, self.time_shift).to(self.device)
        _, h, w = self.latent_shape
        return from_scheduler_config(self.pipe.scheduler.config, num_steps, (h // 2) * (w // 2),
                                     base="flux").to(self.device)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> VAE (scaling and shift factors undone) -> RGB ``[B,3,H,W]`` in [0,1], float32."""
        vae = self.pipe.vae
        latents = x.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
