"""Stable Diffusion 1.x / 2.x behind the Generator interface, wrapping a diffusers ``StableDiffusionPipeline``.

SD's UNet is a DDPM model: ``x_t = a·x0 + s·ε`` with ``a = sqrt(ᾱ_t)``, ``s = sqrt(1-ᾱ_t)``; it predicts ε
(SD 1.x), ``v = a·ε - s·x0`` (SD 2.x: ``scheduler.config.prediction_type == "v_prediction"``) or x0 ("sample").
Dividing by ``a + s`` gives this project's flow convention exactly: ``x_t/(a+s) = (1-σ)·x0 + σ·ε`` with
``σ = s/(a+s)``. Back: ``a = (1-σ)/r``, ``s = σ/r`` with ``r = sqrt((1-σ)² + σ²)`` (so ``a² + s² = 1``), and
``x_t = x·(a+s) = x/r``. The adapter runs the UNet on ``x_t`` at the timestep with that ᾱ (interpolated between
the scheduler's timesteps; exact on them), turns its output into x̂0 and ε̂ and returns the flow velocity
``ε̂ - x̂0``. An Euler step in σ is then exactly a DDIM (η=0) step, and ``samplers.ddim(η)`` is DDIM-η.
"""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from torch import nn

from ..errors import FlowalignError
from .base import Conditioning
from .pipeline import PipelineGenerator

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def vp_coefficients(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPM's ``a = sqrt(ᾱ)``, ``s = sqrt(1-ᾱ)`` at flow noise level σ: a ∝ 1-σ, s ∝ σ, a² + s² = 1."""
    norm = ((1 - sigma) ** 2 + sigma ** 2).sqrt()
    return (1 - sigma) / norm, sigma / norm


def flow_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The flow noise level ``σ = s/(a+s)`` of each DDPM timestep (float32, increasing with t)."""
    alphas_cumprod = alphas_cumprod.float()
    a, s = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    return s / (a + s)


def continuous_timesteps(sigma: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The DDPM timestep of each σ: linear interpolation in ``table`` (``flow_sigmas``, on σ's device); exact on
    its entries, so the σ grid of ``sigmas`` maps back to the scheduler's integer timesteps."""
    upper = torch.searchsorted(table, sigma.float().contiguous()).clamp(1, len(table) - 1)
    low, high = table[upper - 1], table[upper]
    frac = ((sigma.float() - low) / (high - low)).clamp(0, 1)
    return (upper - 1).float() + frac


def flow_velocity(output: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
                  prediction_type: str) -> torch.Tensor:
    """``ε̂ - x̂0`` from a DDPM model's output (ε, v or x0 prediction) at ``x_t = a·x0 + s·ε``, in fp32."""
    output, x_t = output.float(), x_t.float()
    if prediction_type == "epsilon":
        eps = output
        x0 = (x_t - s * eps) / a
    elif prediction_type == "v_prediction":
        x0 = a * x_t - s * output
        eps = s * x_t + a * output
    else:  # "sample"
        x0 = output
        eps = (x_t - a * x0) / s
    return eps - x0


class StableDiffusionGenerator(PipelineGenerator):
    """SD 1.x / 2.x: UNet2DConditionModel, one CLIP text encoder, 4-channel VAE; ε- or v-prediction.

    Sampling follows DDIM's path on the pipeline's noise schedule whatever scheduler class it ships
    (PNDM, Euler, ...), without x̂0 clipping (SD's configs turn it off), and always ends at σ = 0
    (``DDIMScheduler(set_alpha_to_one=False)`` stops one step short, at ᾱ_0 = 1 - β_0)."""

    modality = "image"
    #: ``StableDiffusionPipeline.__call__`` defaults.
    default_steps = 50
    default_guidance = 7.5
    #: The attention projections of every transformer block (self- and cross-attention), as diffusers' LoRA scripts.
    lora_target_modules = ["to_k", "to_q", "to_v", "to_out.0"]
    lora_format = ("StableDiffusionPipeline", "unet")
    pipeline_class: type = StableDiffusionPipeline
    family = "Stable Diffusion"
    #: ``from_pretrained`` arguments: the safety checker is not used here, so it is not loaded.
    load_kwargs: dict = {"safety_checker": None, "requires_safety_checker": False}

    def __init__(self, pipe, device: torch.device | str = "cpu", height: int | None = None,
                 width: int | None = None):
        self.pipe = pipe.to(device)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if module is not None:
                module.eval().requires_grad_(False)
        self._device = torch.device(device)
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise FlowalignError(f"{self.family} scheduler: prediction_type '{self.prediction_type}' "
                                 f"(expected one of {', '.join(PREDICTION_TYPES)})")
        self._ddim = DDIMScheduler.from_config(pipe.scheduler.config)
        self._sigma_table = flow_sigmas(self._ddim.alphas_cumprod).to(self._device)
        default_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.height = height or default_size
        self.width = width or default_size

    @property
    def latent_shape(self) -> tuple[int, ...]:
        scale = self.pipe.vae_scale_factor
        return (self.pipe.unet.config.in_channels, self.height // scale, self.width // scale)

    @property
    def trainable_module(self) -> nn.Module:
        return self.pipe.unet

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompt: str | list[str] | None = "") -> Conditioning:
        """CLIP hidden states, as the pipeline's ``encode_prompt`` builds them (negative branch for CFG)."""
        prompts = list(prompts)
        negatives = negative_prompts(negative_prompt, len(prompts))
        embeds, neg_embeds = self.pipe.encode_prompt(prompts, self.device, 1, negatives is not None,
                                                     negative_prompt=negatives)
        negative = None if negatives is None else {"prompt_embeds": neg_embeds}
        return Conditioning(prompts, {"prompt_embeds": embeds}, negative)

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """The UNet on ``x_t = x·(a+s)`` at the timestep of σ; its ε / v / x0 output as ``ε̂ - x̂0`` (fp32)."""
        dtype = self.pipe.unet.dtype
        a, s = (c.view(-1, *([1] * (x.ndim - 1))) for c in vp_coefficients(sigma.float()))
        x_t = x.float() * (a + s)
        out = self.forward_module(x_t.to(dtype), continuous_timesteps(sigma, self._sigma_table),
                                  encoder_hidden_states=embeds["prompt_embeds"].to(dtype), return_dict=False,
                                  **self._unet_kwargs(embeds, dtype))[0]
        return flow_velocity(out, x_t, a, s, self.prediction_type)

    def _unet_kwargs(self, embeds: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
        """Extra UNet inputs beyond the text hidden states (none for SD 1.x / 2.x)."""
        return {}

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """DDIM's timesteps for ``num_steps`` (the config's ``timestep_spacing``, ``steps_offset``) as σ, then 0."""
        self._ddim.set_timesteps(num_steps)
        sigmas = self._sigma_table[self._ddim.timesteps.long().to(self.device)]
        return torch.cat([sigmas, sigmas.new_zeros(1)])

    def initial_state(self, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """The pipeline starts from ``x_t = ε`` at its first timestep: in flow coordinates ``ε/(a+s) = ε·r``."""
        a, s = vp_coefficients(torch.as_tensor(sigma, dtype=torch.float32, device=noise.device))
        return noise / (a + s)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents at σ = 0 (where ``x == x0``) -> VAE -> RGB images ``[B,3,H,W]`` in [0,1], float32."""
        vae = self.pipe.vae
        images = vae.decode(self._vae_latents(x.to(vae.dtype)), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the latent scaling the UNet was trained on."""
        return x / self.pipe.vae.config.scaling_factor


def negative_prompts(negative_prompt: str | list[str] | None, n: int) -> list[str] | None:
    """One negative prompt per prompt (None: no unconditional branch)."""
    if isinstance(negative_prompt, str):
        return [negative_prompt] * n
    return None if negative_prompt is None else list(negative_prompt)
