"""Z-Image (Z-Image, Z-Image-Turbo) behind the Generator interface, wrapping a diffusers ``ZImagePipeline``.

Latents: the interface's latent is the pipeline's VAE grid ``[C, H/8, W/8]`` (the same ``randn`` as the pipeline's
``prepare_latents``); ``predict`` hands the transformer one ``[C, 1, H/8, W/8]`` tensor per sample, as the pipeline
does, and the transformer patchifies them itself (2x2 patches).

Text: the prompt goes through the Qwen3 chat template, the embeddings are Qwen3's second-to-last hidden state of the
real tokens only, so captions have different lengths. ``encode`` keeps them batch-first: ``prompt_embeds``
``[B, max_sequence_length, D]`` zero-padded, and ``prompt_mask`` ``[B, max_sequence_length]`` (bool) marking the real
tokens; ``predict`` cuts each caption back to its own length before the transformer sees it.

Time and sign: the transformer is given ``1 - σ`` (the pipeline's ``(1000 - t) / 1000``: 0 at pure noise) and
predicts ``x0 - ε``, the negative of the flow velocity; ``predict`` returns ``-output = ε - x0``.

Guidance: the pipeline's CFG is ``pos + g·(pos - neg)``; that is this interface's ``v_u + w·(v_c - v_u)`` with
``w = g + 1`` (the pipeline's guidance_scale 5 is ``guidance=6`` here; ``guidance=1``: no CFG, as g = 0). The
pipeline's ``cfg_normalization`` (off by default; a number c > 0 caps the norm of each sample's guided velocity at
c times that of its conditional one) and ``cfg_truncation`` (1 by default: never; else no CFG where ``1 - σ`` exceeds
it) are the adapter options of the same names.

Time grid: the pipeline's ``linspace(1, 1/N, N)`` shifted by the scheduler (Z-Image: static shift; a dynamic-shift
scheduler config is shifted by the image token count), then 0.
"""
from __future__ import annotations

import torch
from diffusers import ZImagePipeline
from torch import nn

from ..errors import FlowalignError
from ..samplers.timegrid import from_scheduler_config
from .base import Conditioning
from .pipeline import PipelineGenerator

#: The transformer pads each caption and image to a multiple of this many tokens (``SEQ_MULTI_OF`` in diffusers).
TOKEN_MULTIPLE = 32


class ZImageGenerator(PipelineGenerator):
    """Z-Image: single-stream DiT (S3-DiT) over caption and image tokens, Qwen3 text encoder, FLUX VAE."""
    pipeline_class = ZImagePipeline
    family = "Z-Image"

    modality = "image"
    #: ``ZImagePipeline.__call__`` defaults: 50 steps, guidance_scale 5 (= 6 here). Z-Image-Turbo: 8 steps, 1.0.
    default_steps = 50
    default_guidance = 6.0
    #: Flow-Factory's Z-Image LoRA targets: attention and SwiGLU feed-forward of every block (main layers, noise and
    #: context refiners). diffusers' train_dreambooth_lora_z_image.py targets the attention projections only.
    lora_target_modules = ["attention.to_k", "attention.to_q", "attention.to_v", "attention.to_out.0",
                           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    lora_format = ("ZImagePipeline", "transformer")

    def __init__(self, pipe: ZImagePipeline, device: torch.device | str = "cpu", height: int = 1024,
                 width: int = 1024, max_sequence_length: int = 512, cfg_normalization: float = 0.0,
                 cfg_truncation: float = 1.0):
        self.pipe = pipe.to(device)
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
            module.eval().requires_grad_(False)
        self._device = torch.device(device)
        self.height, self.width = int(height), int(width)
        self.max_sequence_length = int(max_sequence_length)
        self._check_sizes()
        if not float(cfg_normalization) >= 0:
            raise FlowalignError(f"Z-Image: cfg_normalization must be >= 0 (0: off), got {cfg_normalization}")
        if not 0 <= float(cfg_truncation) <= 1:
            raise FlowalignError(f"Z-Image: cfg_truncation must be in [0, 1] (1: never), got {cfg_truncation}")
        self.cfg_normalization, self.cfg_truncation = float(cfg_normalization), float(cfg_truncation)

    def _check_sizes(self) -> None:
        """Image sides multiples of the VAE scale x the 2x2 patch; captions and image within the RoPE tables."""
        multiple = self.pipe.vae_scale_factor * 2
        if self.height <= 0 or self.width <= 0 or self.height % multiple or self.width % multiple:
            raise FlowalignError(f"Z-Image: height and width must be positive multiples of {multiple}, "
                                 f"got {self.height}x{self.width}")
        caption_axis, height_axis, width_axis = self.pipe.transformer.config.axes_lens
        longest = caption_axis - TOKEN_MULTIPLE - 1  # the image's frame position comes after the padded caption
        if not 0 < self.max_sequence_length <= longest:
            raise FlowalignError(f"Z-Image: max_sequence_length must be in [1, {longest}] (the transformer's "
                                 f"caption positions), got {self.max_sequence_length}")
        if self.height // multiple > height_axis or self.width // multiple > width_axis:
            raise FlowalignError(f"Z-Image: height and width must be at most {height_axis * multiple}x"
                                 f"{width_axis * multiple} (the transformer's positions), "
                                 f"got {self.height}x{self.width}")

    @property
    def latent_shape(self) -> tuple[int, ...]:
        scale = self.pipe.vae_scale_factor
        return (self.pipe.transformer.config.in_channels, self.height // scale, self.width // scale)

    @property
    def trainable_module(self) -> nn.Module:
        return self.pipe.transformer

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompt: str | list[str] | None = "") -> Conditioning:
        """Qwen3 embeddings of the chat-templated prompts, as ``ZImagePipeline.encode_prompt`` builds them, padded
        to ``max_sequence_length`` with a mask of the real tokens."""
        prompts = list(prompts)
        positive = self._encode(prompts)
        negative = None
        if negative_prompt is not None:
            negative_prompt = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
            negative = self._encode(list(negative_prompt))
        return Conditioning(prompts, positive, negative)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        # encode_prompt rewrites the list it is given (the chat template): give it a copy.
        captions, _ = self.pipe.encode_prompt(prompt=list(prompts), device=self.device,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=self.max_sequence_length)
        first = captions[0]
        embeds = first.new_zeros((len(captions), self.max_sequence_length, first.shape[-1]))
        mask = torch.zeros((len(captions), self.max_sequence_length), dtype=torch.bool, device=first.device)
        for row, caption in enumerate(captions):
            embeds[row, :len(caption)] = caption
            mask[row, :len(caption)] = True
        return {"prompt_embeds": embeds, "prompt_mask": mask}

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """One transformer pass on per-sample lists (latent ``[C,1,h,w]``, the caption's real tokens) at ``1 - σ``;
        the model predicts ``x0 - ε``, so the velocity is its negative."""
        dtype = self.pipe.transformer.dtype
        latents = list(x.to(dtype).unsqueeze(2).unbind(0))
        captions = [row[mask] for row, mask in zip(embeds["prompt_embeds"].to(dtype), embeds["prompt_mask"])]
        timestep = 1.0 - sigma.float()
        out = self.forward_module(latents, timestep, captions, return_dict=False)[0]
        return -torch.stack([sample.float() for sample in out]).squeeze(2)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning,
                 guidance: float = 1.0) -> torch.Tensor:
        """The base class's CFG; with the pipeline's ``cfg_truncation`` / ``cfg_normalization`` set, as it does them."""
        if guidance == 1.0 or cond.negative is None or (self.cfg_normalization == 0 and self.cfg_truncation == 1):
            return super().velocity(x, sigma, cond, guidance)
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        unguided = (1.0 - sigma) > self.cfg_truncation  # the pipeline's t_norm = (1000 - t) / 1000 > truncation
        if bool(unguided.all()):  # the pipeline then skips the unconditional pass
            return self.predict(x, sigma, cond.positive)
        both = {k: torch.cat([cond.negative[k], cond.positive[k]]) for k in cond.positive}
        v_uncond, v_cond = self.predict(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        guided = v_cond + (guidance - 1.0) * (v_cond - v_uncond)  # the pipeline's pos + g·(pos - neg)
        per_sample = (-1, *[1] * (x.ndim - 1))
        if self.cfg_normalization > 0:  # cap each sample's norm at cfg_normalization x its conditional one's
            cap = self.cfg_normalization * torch.linalg.vector_norm(v_cond.flatten(1), dim=1)
            norm = torch.linalg.vector_norm(guided.flatten(1), dim=1)
            guided = guided * (cap / norm.clamp_min(1e-12)).clamp(max=1.0).view(per_sample)
        return torch.where(unguided.view(per_sample), v_cond, guided)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The pipeline's grid: ``linspace(1, 1/N, N)`` shifted (statically, or by the image token count), then 0."""
        _, h, w = self.latent_shape
        return from_scheduler_config(self.pipe.scheduler.config, num_steps, (h // 2) * (w // 2),
                                     base="flux").to(self.device)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> VAE (scaling and shift factors undone) -> RGB ``[B,3,H,W]`` in [0,1], float32."""
        vae = self.pipe.vae
        latents = x.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
