"""HunyuanVideo 1.5 text-to-video behind the Generator interface, wrapping a diffusers ``HunyuanVideo15Pipeline``.

HunyuanVideo 1.5 is a rectified-flow model: the transformer's output at timestep σ·1000 (cast to the
transformer's dtype, as the pipeline does) is the velocity ``ε - x0``. Latents are ``[32, (F-1)/4 + 1, H/16, W/16]``
(the VAE's latent channels and compression). For text-to-video the transformer's input is the latents
concatenated with zero image-condition latents and a zero mask channel (``2C + 1`` channels), and its
image-embedding input is zeros (``729 x 1152``), which the transformer masks out: ``predict`` builds both
per call, so the conditioning holds only batch-first tensors.

Prompts: ``encode`` is the pipeline's ``encode_prompt``: the Qwen2.5-VL text model's third-from-last hidden
state over a chat template (system prompt cropped off, padded to ``max_sequence_length``) with its attention
mask, and the ByT5 glyph encoder over the quoted text of the prompt (zeros and a zero mask when there is none)
with its mask. The four tensors are carried batch-first (masks in the transformer's dtype, as the pipeline casts
them). The negative branch is the same for ``negative_prompt`` (the pipeline's default is "").

Guidance: the pipeline's ``guider`` (``ClassifierFreeGuidance``) sets the scale (``default_guidance``: its
``guidance_scale``, 6.0 for the released checkpoints; 1.0 when it is disabled). ``velocity`` applies the
guider's formulation with the caller's scale: ``v_u + w(v_c - v_u)``, or ``v_c + w(v_c - v_u)`` with
``use_original_formulation``, then ``guidance_rescale`` when set. Guiders with a start/stop step window are
rejected.

Grid: the pipeline passes ``linspace(1, 0, N+1)[:-1]`` to its ``FlowMatchEulerDiscreteScheduler``, which applies
its static shift (5 for 480p, 9 for 720p T2V) and appends 0; ``sigmas`` returns exactly that.

Decode: latents / ``scaling_factor`` -> VAE -> video ``[B, F, 3, H, W]`` in [0, 1]. The VAE decodes one sample
at a time: in diffusers 0.42.1 its mid-block attention mask breaks for a batch larger than 1 (what
``pipe.vae.enable_slicing()`` also avoids).

LoRA: ``HunyuanVideo15Pipeline`` has no ``load_lora_weights``; the saved file is the pipeline LoRA format
(``transformer.``-prefixed keys), which ``pipe.transformer.load_lora_adapter(dir, prefix="transformer",
use_safetensors=True)`` loads.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.guiders.guider_utils import rescale_noise_cfg
from torch import nn

from ..errors import FlowalignError
from .base import Conditioning
from .pipeline import PipelineGenerator

EMBED_NAMES = ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")


class HunyuanVideo15Generator(PipelineGenerator):
    """HunyuanVideo 1.5 T2V (480p / 720p, and the CFG-distilled 480p): dual-stream DiT, Qwen2.5-VL + ByT5 text."""
    pipeline_class = HunyuanVideo15Pipeline
    family = "HunyuanVideo 1.5"

    modality = "video"
    #: ``HunyuanVideo15Pipeline.__call__``'s steps; the guidance default is the guider's scale (set per instance).
    default_steps = 50
    default_guidance = 6.0
    #: The joint attention projections of both streams (SimpleTuner's HunyuanVideo 1.5 LoRA targets); ``to_q`` ...
    #: ``to_out.0`` also match the token refiner's self-attention.
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    #: No ``save_lora_weights`` there: ``save_lora_diffusers`` writes the pipeline LoRA format for ``transformer``.
    lora_format = ("HunyuanVideo15Pipeline", "transformer")

    def __init__(self, pipe: HunyuanVideo15Pipeline, device: torch.device | str = "cpu", height: int | None = None,
                 width: int | None = None, num_frames: int = 121, max_sequence_length: int = 1000):
        self.pipe = pipe.to(device)
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.eval().requires_grad_(False)
        self._device = torch.device(device)
        self.height, self.width = self._size(height, width)
        temporal = pipe.vae_scale_factor_temporal
        if num_frames < 1 or (num_frames - 1) % temporal:
            raise FlowalignError(f"HunyuanVideo 1.5: num_frames - 1 must be a multiple of {temporal}, got {num_frames}")
        if max_sequence_length < 1:
            raise FlowalignError(f"HunyuanVideo 1.5: max_sequence_length must be >= 1, got {max_sequence_length}")
        self.num_frames = num_frames
        pipe.tokenizer_max_length = max_sequence_length  # the pipeline's own padding length (1000)
        self.num_train_timesteps = pipe.scheduler.config.num_train_timesteps
        self._read_guider(pipe.guider)

    def _size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The options, or the pipeline's default (16:9 at the transformer's ``target_size``: 480x848 for 480p)."""
        pipe = self.pipe
        if height is None and width is None:
            height, width = pipe.video_processor.calculate_default_height_width(
                pipe.default_aspect_ratio[1], pipe.default_aspect_ratio[0], pipe.target_size)
        multiple = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size
        if height is None or width is None or height % multiple or width % multiple or min(height, width) < multiple:
            raise FlowalignError(f"HunyuanVideo 1.5: height and width must both be positive multiples of {multiple}, "
                                 f"got {height}x{width}")
        return height, width

    def _read_guider(self, guider) -> None:
        """The pipeline guider's CFG formulation, rescale and default scale."""
        if not isinstance(guider, ClassifierFreeGuidance):
            raise FlowalignError(f"HunyuanVideo 1.5: the pipeline's guider must be ClassifierFreeGuidance, "
                                 f"got {type(guider).__name__}")
        config = guider.config
        if config.start > 0.0 or config.stop < 1.0:
            raise FlowalignError(f"HunyuanVideo 1.5: a guider with a step window (start {config.start}, stop "
                                 f"{config.stop}) is not supported; expected start 0 and stop 1")
        self.original_formulation = bool(config.use_original_formulation)
        self.guidance_rescale = float(config.guidance_rescale)
        no_cfg = 0.0 if self.original_formulation else 1.0
        self.default_guidance = float(config.guidance_scale) if config.enabled else no_cfg

    @property
    def latent_shape(self) -> tuple[int, ...]:
        spatial, temporal = self.pipe.vae_scale_factor_spatial, self.pipe.vae_scale_factor_temporal
        return (self.pipe.num_channels_latents, (self.num_frames - 1) // temporal + 1,
                self.height // spatial, self.width // spatial)

    @property
    def trainable_module(self) -> nn.Module:
        return self.pipe.transformer

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompt: str | list[str] | None = "") -> Conditioning:
        """The pipeline's ``encode_prompt`` for the prompts and, unless ``negative_prompt`` is None, the negatives."""
        prompts = list(prompts)
        positive = self._encode(prompts)
        if negative_prompt is None:
            return Conditioning(prompts, positive)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise FlowalignError(f"HunyuanVideo 1.5: {len(negatives)} negative prompts for {len(prompts)} prompts")
        return Conditioning(prompts, positive, self._encode(negatives))

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        tensors = self.pipe.encode_prompt(prompt=texts, device=self.device, dtype=self.pipe.transformer.dtype,
                                          batch_size=len(texts))
        return dict(zip(EMBED_NAMES, tensors))

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """The velocity at timesteps σ·1000, with the text-to-video zero image condition built here."""
        dtype = self.pipe.transformer.dtype
        x = x.to(dtype)
        batch = x.shape[0]
        condition = x.new_zeros((batch, x.shape[1] + 1, *x.shape[2:]))  # zero image latents + zero mask channel
        image_embeds = x.new_zeros((batch, self.pipe.vision_num_semantic_tokens, self.pipe.vision_states_dim))
        timestep = (sigma.float() * self.num_train_timesteps).to(dtype)  # the pipeline casts t to the latents' dtype
        out = self.forward_module(
            hidden_states=torch.cat([x, condition], dim=1), timestep=timestep,
            encoder_hidden_states=embeds["prompt_embeds"].to(dtype),
            encoder_attention_mask=embeds["prompt_embeds_mask"].to(dtype),
            encoder_hidden_states_2=embeds["prompt_embeds_2"].to(dtype),
            encoder_attention_mask_2=embeds["prompt_embeds_mask_2"].to(dtype),
            image_embeds=image_embeds, return_dict=False)[0]
        return out.float()

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning,
                 guidance: float = 1.0) -> torch.Tensor:
        """The guider's CFG at scale ``guidance``: the original formulation ``v_c + w(v_c - v_u)`` is the default one
        at ``w + 1``; ``guidance_rescale`` rescales the guided velocity towards ``v_c``'s per-sample std."""
        scale = guidance + 1.0 if self.original_formulation else guidance
        if math.isclose(scale, 1.0) or cond.negative is None:  # the guider skips CFG there too
            return super().velocity(x, sigma, cond, 1.0)
        if self.guidance_rescale <= 0.0:
            return super().velocity(x, sigma, cond, scale)
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(x.shape[0])
        both = {k: torch.cat([cond.negative[k], cond.positive[k]]) for k in cond.positive}
        v_uncond, v_cond = self.predict(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        return rescale_noise_cfg(v_uncond + scale * (v_cond - v_uncond), v_cond, self.guidance_rescale)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The pipeline's grid: ``linspace(1, 0, N+1)[:-1]`` through its scheduler's shift, then 0."""
        scheduler = self.pipe.scheduler
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or scheduler.config.get("use_dynamic_shifting"):
            raise FlowalignError(f"HunyuanVideo 1.5: expected a FlowMatchEulerDiscreteScheduler with a static shift, "
                                 f"got {type(scheduler).__name__}")
        fresh = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        fresh.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1])
        return fresh.sigmas.float().to(self.device)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents / scaling_factor -> VAE (one sample at a time) -> video ``[B, F, 3, H, W]`` in [0, 1], float32."""
        vae = self.pipe.vae
        latents = x.to(vae.dtype) / vae.config.scaling_factor
        video = torch.cat([vae.decode(one, return_dict=False)[0] for one in latents.split(1)])  # [B, 3, F, H, W]
        return (video.float().permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1)
