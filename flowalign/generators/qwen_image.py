"""Qwen-Image behind the Generator interface, wrapping a diffusers ``QwenImagePipeline``.

Latents: the interface's latent is the *unpacked* VAE grid ``[C, H/8, W/8]`` (C = 16; the pipeline's ``randn`` of
shape ``[B, 1, C, H/8, W/8]`` has the same numbers, so a seed means the same noise); ``predict`` packs it into
2x2-patch tokens ``[H/16·W/16, 4C]`` for the MMDiT and unpacks the velocity again. Qwen-Image is a rectified-flow
model: the transformer's output, at timestep ``t/1000`` with ``t = σ·1000`` (as the pipeline passes it), is the
velocity ``ε - x0``. ``decode`` undoes the VAE's per-channel ``latents_mean`` / ``latents_std``.

Text: Qwen2.5-VL's last hidden states of the chat template, its first ``prompt_template_encode_start_idx`` (34)
tokens dropped, as ``encode_prompt`` builds them; the rows are zero-padded to ``max_sequence_length`` with the
attention mask carried beside them (``prompt_embeds_mask``, batch-first), so cached rows of any prompt stack.
``predict`` cuts the batch back to its longest prompt and passes no mask when every token is valid, as the pipeline.

Guidance: the pipeline's "true CFG" ``true_cfg_scale``: ``v = v_u + w·(v_c - v_u)``, then each 2x2-patch token of
``v`` rescaled to the norm of ``v_c``'s (over its 4C channels); ``norm_rescale=False`` keeps plain CFG. Both branches
run in one batched pass. Time grid: the pipeline's ``linspace(1, 1/N, N)``, shifted dynamically by the image token
count (the scheduler's exponential shift with ``shift_terminal``), then 0.
"""
from __future__ import annotations

import torch
from diffusers import QwenImagePipeline
from torch import nn

from ..errors import FlowalignError
from ..samplers.timegrid import from_scheduler_config
from .base import Conditioning
from .pipeline import PipelineGenerator

#: The pipeline refuses longer text (``check_inputs``).
MAX_SEQUENCE_LENGTH = 1024


class QwenImageGenerator(PipelineGenerator):
    """Qwen-Image (20B MMDiT), Qwen2.5-VL text encoder, a Wan-style VAE with 16 latent channels."""
    pipeline_class = QwenImagePipeline
    family = "Qwen-Image"

    modality = "image"
    #: ``QwenImagePipeline.__call__`` defaults (``true_cfg_scale`` 4; CFG needs a negative prompt, e.g. " ").
    default_steps = 50
    default_guidance = 4.0
    #: Flow-GRPO's Qwen-Image LoRA targets (scripts/train_qwenimage.py): the joint attention's image and text
    #: projections and both streams' feed-forwards of every block.
    lora_target_modules = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                           "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj",
                           "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
    lora_format = ("QwenImagePipeline", "transformer")

    def __init__(self, pipe: QwenImagePipeline, device: torch.device | str = "cpu", height: int | None = None,
                 width: int | None = None, max_sequence_length: int = 512, norm_rescale: bool = True):
        if pipe.transformer.config.guidance_embeds:
            raise FlowalignError("Qwen-Image: transformers with guidance_embeds (guidance-distilled) are not supported")
        self.pipe = pipe.to(device)
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
            module.eval().requires_grad_(False)
        self._device = torch.device(device)
        default_size = pipe.default_sample_size * pipe.vae_scale_factor
        self.height, self.width = height or default_size, width or default_size
        multiple = pipe.vae_scale_factor * 2  # the VAE's downsampling times the 2x2 packing
        if self.height % multiple or self.width % multiple:
            raise FlowalignError(f"Qwen-Image: height and width must be multiples of {multiple}, "
                                 f"got {self.height}x{self.width}")
        if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise FlowalignError(f"Qwen-Image: max_sequence_length must be in [1, {MAX_SEQUENCE_LENGTH}], "
                                 f"got {max_sequence_length}")
        if not isinstance(norm_rescale, bool):
            raise FlowalignError(f"Qwen-Image: norm_rescale must be true or false, got {norm_rescale!r}")
        self.max_sequence_length = max_sequence_length
        self.norm_rescale = norm_rescale

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
        """Qwen2.5-VL embeddings and their attention mask, as ``QwenImagePipeline.encode_prompt`` builds them,
        zero-padded (mask 0) to ``max_sequence_length``."""
        prompts = list(prompts)
        positive = self._encode(prompts)
        negative = None
        if negative_prompt is not None:
            negative_prompt = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
            negative = self._encode(list(negative_prompt))
        return Conditioning(prompts, positive, negative)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, mask = self.pipe.encode_prompt(prompt=prompts, device=self.device,
                                               max_sequence_length=self.max_sequence_length)
        if mask is None:  # encode_prompt drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        pad = self.max_sequence_length - embeds.shape[1]
        return {"prompt_embeds": nn.functional.pad(embeds, (0, 0, 0, pad)),
                "prompt_embeds_mask": nn.functional.pad(mask, (0, pad))}

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pack the latents, run the transformer at timestep ``(σ·1000)/1000`` on the batch's text (cut to its
        longest prompt), unpack: the velocity ``ε - x0`` on the latent grid."""
        pipe = self.pipe
        b, c, h, w = x.shape
        tokens = pipe._pack_latents(x.to(pipe.transformer.dtype), b, c, h, w)
        out = self._transformer_pass(tokens, [[(1, h // 2, w // 2)]] * b, sigma, embeds)
        scale = pipe.vae_scale_factor
        return pipe._unpack_latents(out, h * scale, w * scale, scale)[:, :, 0].float()

    def _transformer_pass(self, tokens: torch.Tensor, img_shapes: list, sigma: torch.Tensor,
                          embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer on packed image tokens at timestep ``(σ·1000)/1000``, with the batch's text cut to its
        longest prompt: its output tokens (the image-editing adapter appends source tokens here)."""
        dtype = self.pipe.transformer.dtype
        text, mask = trim_text(embeds["prompt_embeds"], embeds["prompt_embeds_mask"])
        timestep = (sigma.float() * 1000).to(dtype) / 1000  # the pipeline's t.to(latents.dtype) / 1000
        return self.forward_module(hidden_states=tokens, timestep=timestep, encoder_hidden_states=text.to(dtype),
                                   encoder_hidden_states_mask=mask, img_shapes=img_shapes, return_dict=False)[0]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning,
                 guidance: float = 1.0) -> torch.Tensor:
        """The pipeline's true CFG: ``v_u + w·(v_c - v_u)``, each 2x2-patch token rescaled to ``v_c``'s norm
        (unless ``norm_rescale`` is off); both branches in one model pass."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if guidance == 1.0 or cond.negative is None:
            return self.predict(x, sigma, cond.positive)
        both = {k: torch.cat([cond.positive[k], cond.negative[k]]) for k in cond.positive}
        v_cond, v_uncond = self.predict(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        combined = v_uncond + guidance * (v_cond - v_uncond)
        return rescale_to_norm(combined, v_cond) if self.norm_rescale else combined

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The pipeline's grid: ``linspace(1, 1/N, N)`` shifted dynamically by the image token count, then 0."""
        _, h, w = self.latent_shape
        return from_scheduler_config(self.pipe.scheduler.config, num_steps, (h // 2) * (w // 2),
                                     base="flux").to(self.device)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> de-normalised (``latents_mean`` / ``latents_std``) -> VAE -> RGB ``[B,3,H,W]`` in [0,1]."""
        vae = self.pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(x.device, vae.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(x.device, vae.dtype)
        images = vae.decode(x.to(vae.dtype).unsqueeze(2) / inv_std + mean, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)


def trim_text(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut padded text to the batch's longest prompt (one host sync); no mask when every token left is valid,
    as ``encode_prompt`` hands the transformer exactly the batch's own padding."""
    valid = mask.bool()
    position = torch.arange(1, valid.shape[1] + 1, device=valid.device)
    length = (valid.any(dim=0) * position).max().clamp(min=1)  # 1 + the last column any prompt uses
    all_valid = (valid.all(dim=0) | (position > length)).all()
    length, all_valid = torch.stack([length, all_valid.long()]).tolist()
    return embeds[:, :length], None if all_valid else valid[:, :length]


def rescale_to_norm(combined: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each 2x2-patch token of ``combined`` ``[B,C,H,W]`` scaled to the norm of ``reference``'s token (over its 4C
    values): the pipeline's ``comb_pred · ‖noise_pred‖ / ‖comb_pred‖`` on the packed ``[B, tokens, 4C]``."""
    b, c, h, w = combined.shape
    patches = (b, c, h // 2, 2, w // 2, 2)
    combined_p, reference_p = combined.reshape(patches), reference.reshape(patches)
    dims = (1, 3, 5)
    norm = torch.linalg.vector_norm
    scale = norm(reference_p, dim=dims, keepdim=True) / norm(combined_p, dim=dims, keepdim=True)
    return (combined_p * scale).reshape(b, c, h, w)
