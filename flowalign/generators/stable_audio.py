"""Stable Audio Open behind the Generator interface, wrapping a diffusers ``StableAudioPipeline``.

Stable Audio is *not* a rectified-flow model: it is an EDM-style denoiser (``CosineDPMSolverMultistepScheduler``,
v-prediction with ``sigma_data``). Its noisy latents are ``x = x0 + s·ε`` (s = the scheduler's sigma, from
``sigma_max`` = 500 down to ``sigma_min``). The flow convention ``x_σ = (1-σ)x0 + σε`` is the same path rescaled:

    x_flow = x / (1 + s),   σ = s / (1 + s)      (so  x = x_flow / (1 - σ),  s = σ / (1 - σ))

``predict`` maps flow coordinates to EDM ones, runs the transformer through the scheduler's own
preconditioning (``precondition_inputs`` = c_in, ``precondition_noise`` = c_noise, ``precondition_outputs``
= c_skip·x + c_out·F, giving x0), and returns the flow velocity ``v = ε - x0 = (x_flow - x0) / σ``. This
is exact, not an approximation: CFG on v equals the pipeline's CFG on the model output (both affine in F).
``sigmas`` are the scheduler's noise levels mapped to σ (so σ stops short of 1: σ_max/(1+σ_max) ≈ 0.998),
and ``initial_state`` maps the standard-normal ``initial_noise`` to the pipeline's start
``randn · init_noise_sigma`` in flow coordinates. Sampling with these sigmas uses flowalign's Euler / SDE
steps, not the pipeline's DPM-Solver.

LoRA: ``StableAudioDiTModel`` lacks diffusers' ``PeftAdapterMixin``, and ``StableAudioPipeline`` has no
``load_lora_weights``; ``enable_lora_adapters`` mixes it into the transformer, and a trained LoRA is saved in
the pipeline LoRA format (``transformer.``-prefixed keys and metadata), which
``enable_lora_adapters(pipe.transformer).load_lora_adapter(dir, use_safetensors=True)`` loads (that loader
looks for a ``.bin`` file unless told ``use_safetensors``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableAudioPipeline
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from torch import nn

from ..errors import FlowalignError
from .base import Conditioning
from .pipeline import PipelineGenerator


def enable_lora_adapters(module: nn.Module) -> nn.Module:
    """Give a diffusers model without ``PeftAdapterMixin`` (``StableAudioDiTModel``) its LoRA methods
    (``add_adapter``, ``load_lora_adapter``, ``disable_adapters``, ...) by switching it to a subclass with the mixin."""
    from diffusers.loaders.peft import PeftAdapterMixin

    if not isinstance(module, PeftAdapterMixin):
        cls = type(module)
        module.__class__ = type(cls.__name__, (cls, PeftAdapterMixin), {"__module__": cls.__module__})
    return module


class StableAudioGenerator(PipelineGenerator):
    """Stable Audio Open: DiT over VAE latents ``[C, L]``, T5 + number conditioners for the duration."""
    pipeline_class = StableAudioPipeline
    family = "Stable Audio"

    modality = "audio"
    #: ``StableAudioPipeline.__call__`` defaults.
    default_steps = 100
    default_guidance = 7.0
    #: The self- and cross-attention projections of every DiT block.
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    #: No ``save_lora_weights`` there: ``save_lora_diffusers`` writes the pipeline LoRA format for ``transformer``.
    lora_format = ("StableAudioPipeline", "transformer")

    def __init__(self, pipe: StableAudioPipeline, device: torch.device | str = "cpu",
                 audio_end_in_s: float | None = None, audio_start_in_s: float = 0.0):
        self.pipe = pipe.to(device)
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.projection_model):
            module.eval().requires_grad_(False)
        enable_lora_adapters(pipe.transformer)
        self._device = torch.device(device)
        rate = pipe.vae.config.sampling_rate
        max_seconds = pipe.transformer.config.sample_size * pipe.vae.hop_length / rate
        self.audio_start_in_s = audio_start_in_s
        self.audio_end_in_s = max_seconds if audio_end_in_s is None else audio_end_in_s
        if not 0 <= audio_start_in_s < self.audio_end_in_s <= audio_start_in_s + max_seconds:
            raise FlowalignError(f"Stable Audio: need 0 <= audio_start_in_s < audio_end_in_s and at most "
                                 f"{max_seconds} s of audio, got {audio_start_in_s}..{self.audio_end_in_s}")

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None, local_files_only: bool = False,
                        **kwargs) -> "StableAudioGenerator":
        """``PipelineGenerator.from_pretrained``, after checking for torchsde (``kwargs``: audio_end_in_s, ...)."""
        from diffusers.utils import is_torchsde_available

        if not is_torchsde_available():  # its CosineDPMSolverMultistepScheduler needs it
            raise FlowalignError("Stable Audio needs torchsde: pip install 'flowalign[audio]' (or torchsde)")
        return super().from_pretrained(path, dtype, device, local_files_only, **kwargs)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        config = self.pipe.transformer.config
        return (config.in_channels, config.sample_size)

    @property
    def trainable_module(self) -> nn.Module:
        return self.pipe.transformer

    def initial_state(self, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """EDM's start ``noise · sqrt(s² + σ_data²)`` at s = σ/(1-σ), in flow coordinates (÷ (1 + s)); at the
        grid's first level s = σ_max: the pipeline's ``randn · init_noise_sigma`` (σ_data = 1) ÷ (1 + σ_max)."""
        s = torch.as_tensor(sigma, dtype=torch.float64)
        s = s / (1 - s)
        scale = (s ** 2 + self.pipe.scheduler.config.sigma_data ** 2).sqrt() / (1 + s)
        return noise * scale.float().to(noise.device)

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompt: str | list[str] | None = "") -> Conditioning:
        """Projected T5 embeddings followed by the start / end-seconds tokens, and the seconds as global state.

        An empty negative prompt is the pipeline's default unconditional branch (zeros for the text and seconds
        tokens, the same global state); a non-empty one is encoded like the prompt."""
        prompts = list(prompts)
        pipe = self.pipe
        start, end = pipe.encode_duration(self.audio_start_in_s, self.audio_end_in_s, self.device, False, len(prompts))
        global_states = torch.cat([start, end], dim=2)

        def branch(texts: list[str]) -> dict[str, torch.Tensor]:
            text = pipe.encode_prompt(texts, self.device, do_classifier_free_guidance=False)
            return {"prompt_embeds": torch.cat([text, start, end], dim=1), "global": global_states}

        positive = branch(prompts)
        negative = None
        if negative_prompt is not None:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if all(n == "" for n in negatives):
                negative = {"prompt_embeds": torch.zeros_like(positive["prompt_embeds"]), "global": global_states}
            else:
                negative = branch(negatives)
        return Conditioning(prompts, positive, negative)

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """Flow coordinates -> EDM (x/(1-σ), s = σ/(1-σ)) -> preconditioned DiT -> x0 -> ``v = (x - x0) / σ``.

        σ is clamped to the scheduler's top level σ_max/(1+σ_max): the EDM map is singular at σ = 1."""
        scheduler, dtype = self.pipe.scheduler, self.pipe.transformer.dtype
        s_max = scheduler.config.sigma_max
        sigma = sigma.double().clamp(max=s_max / (1 + s_max))
        s = (sigma / (1 - sigma)).float().view(-1, 1, 1)
        x_edm = x.float() / (1 - sigma).float().view(-1, 1, 1)
        model_in = scheduler.precondition_inputs(x_edm, s)
        timestep = scheduler.precondition_noise(s.flatten())
        global_states = embeds["global"]
        rotary = get_1d_rotary_pos_embed(self.pipe.rotary_embed_dim, x.shape[-1] + global_states.shape[1],
                                         use_real=True, repeat_interleave_real=False)
        out = self.forward_module(model_in.to(dtype), timestep.to(dtype),
                                  encoder_hidden_states=embeds["prompt_embeds"].to(dtype),
                                  global_hidden_states=global_states.to(dtype),
                                  rotary_embedding=tuple(r.to(x.device) for r in rotary), return_dict=False)[0]
        x0 = scheduler.precondition_outputs(x_edm, out.float(), s)
        return (x.float() - x0) / sigma.float().view(-1, 1, 1)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The scheduler's ``num_steps`` noise levels s (and the final 0), mapped to σ = s / (1 + s)."""
        fresh = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        fresh.set_timesteps(num_steps)
        s = fresh.sigmas.double()
        return (s / (1 + s)).float().to(self.device)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> Oobleck VAE -> waveform ``[B, C, L]`` cropped to [start, end) seconds, clamped to [-1, 1]."""
        vae = self.pipe.vae
        audio = vae.decode(x.to(vae.dtype)).sample
        rate = vae.config.sampling_rate
        audio = audio[:, :, int(self.audio_start_in_s * rate):int(self.audio_end_in_s * rate)]
        return audio.float().clamp(-1, 1)
