"""FLUX.2 behind the Generator interface: [klein] (``Flux2KleinPipeline``) and [dev] (``Flux2Pipeline``).

Text: [klein] encodes with a Qwen3 causal LM, [dev] with Mistral Small 3 (its processor's chat template, with the
pipeline's system message); the prompt, padded to ``max_sequence_length``, becomes the hidden states of the layers
``text_encoder_out_layers`` ([klein] 9, 18, 27; [dev] 10, 20, 30) side by side, as the pipelines'
``encode_prompt`` builds them. The 4-d position ids ``(t, h, w, l)`` of text (``l`` = token index) and image
tokens (``h``, ``w`` = token row and column) are rebuilt inside ``predict``.

Latents: the interface's latent is the pipelines' own noise grid ``[C·4, H/2s, W/2s]`` (s = VAE scale): the VAE
latent already patchified 2x2 and normalised by the VAE's batch-norm statistics, so a seed means the same noise as
the pipeline's ``randn``. ``predict`` flattens it into ``H/2s·W/2s`` tokens; ``decode`` undoes the batch norm
(``x·sqrt(var + eps) + mean``) and the patchify before the VAE. The transformer takes the timestep σ (the
pipelines pass ``t/1000``) and predicts the velocity ``ε - x0`` directly: no conversion.

Guidance: [klein] base checkpoints (``is_distilled`` false) use real CFG with the empty negative prompt,
``v_u + w·(v_c - v_u)``: the interface's ``guidance`` (pipeline default 4.0). [klein] step-distilled checkpoints
(``is_distilled`` true, 4 steps) have no CFG: the pipeline ignores its ``guidance_scale``, and here a guidance
other than 1 is an error. [dev] is guidance-distilled: its guidance is a transformer input, the adapter's
``embedded_guidance`` (the pipeline's ``guidance_scale``, 4.0); the interface's ``guidance`` would add real CFG,
which its pipeline does not have (keep it 1).

Time grid: the pipelines', ``linspace(1, 1/N, N)`` shifted with ``mu = compute_empirical_mu(tokens, N)`` (which
depends on the step count as well as the image size), then 0.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from torch import nn

from ..errors import FlowalignError
from .base import Conditioning
from .pipeline import PipelineGenerator

#: Flow-Factory's FLUX.2 LoRA targets (attention, added-context projections and both feed-forwards of the
#: double-stream blocks; the fused QKV+MLP input projection of the single-stream blocks). The single-stream blocks'
#: output projections (diffusers' FLUX.2 LoRA scripts) are added per model: ``attn.to_out`` alone would also name
#: the double-stream blocks' output list.
DOUBLE_STREAM_AND_FUSED_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                                   "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.linear_in",
                                   "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
                                   "attn.to_qkv_mlp_proj"]


class _Flux2Generator(PipelineGenerator):
    """What [klein] and [dev] share: the transformer, the VAE, the latent layout, the grid and the encoder call."""
    modality = "image"
    default_steps = 50  # both pipelines' ``num_inference_steps`` default
    lora_target_modules = DOUBLE_STREAM_AND_FUSED_TARGETS

    def __init__(self, pipe, device: torch.device | str, height: int | None, width: int | None,
                 max_sequence_length: int, text_encoder_out_layers: list[int] | tuple[int, ...]):
        self.pipe = pipe.to(device)
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
            if module is not None:
                module.eval().requires_grad_(False)
        self._device = torch.device(device)
        default_size = pipe.default_sample_size * pipe.vae_scale_factor
        self.height, self.width = height or default_size, width or default_size
        multiple = pipe.vae_scale_factor * 2  # the VAE's downsampling times the 2x2 patchify
        if self.height % multiple or self.width % multiple:
            raise FlowalignError(f"{self.family}: height and width must be multiples of {multiple}, "
                                 f"got {self.height}x{self.width}")
        if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise FlowalignError(f"{self.family}: max_sequence_length must be a positive integer, "
                                 f"got {max_sequence_length!r}")
        self.max_sequence_length = max_sequence_length
        self.text_encoder_out_layers = self._check_out_layers(text_encoder_out_layers)
        blocks = len(pipe.transformer.single_transformer_blocks)
        singles = [f"single_transformer_blocks.{i}.attn.to_out" for i in range(blocks)]
        self.lora_target_modules = [*DOUBLE_STREAM_AND_FUSED_TARGETS, *singles]
        self.embedded_guidance: float | None = None

    def _check_out_layers(self, layers) -> tuple[int, ...]:
        """The encoder layers whose hidden states are stacked: valid indices whose widths add up to the
        transformer's ``joint_attention_dim``."""
        if isinstance(layers, int) or not layers or not all(isinstance(k, int) for k in layers):
            raise FlowalignError(f"{self.family}: text_encoder_out_layers must be a list of layer indices, "
                                 f"got {layers!r}")
        layers = tuple(layers)
        encoder = self.pipe.text_encoder
        if encoder is None:  # loaded without its encoder: prompt embeddings come from a file
            return layers
        config = getattr(encoder.config, "text_config", encoder.config)
        if not all(0 <= k <= config.num_hidden_layers for k in layers):
            raise FlowalignError(f"{self.family}: text_encoder_out_layers {list(layers)} must lie in 0.."
                                 f"{config.num_hidden_layers} (the text encoder's hidden states)")
        expected = self.pipe.transformer.config.joint_attention_dim
        if len(layers) * config.hidden_size != expected:
            raise FlowalignError(f"{self.family}: text_encoder_out_layers gives {len(layers)} x {config.hidden_size} "
                                 f"features, the transformer expects {expected}")
        return layers

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The pipeline's noise grid ``[C·4, H/2s, W/2s]``: patchified, batch-normalised VAE latents."""
        multiple = self.pipe.vae_scale_factor * 2
        return (self.pipe.transformer.config.in_channels, self.height // multiple, self.width // multiple)

    @property
    def trainable_module(self) -> nn.Module:
        return self.pipe.transformer

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompt: str | list[str] | None = "") -> Conditioning:
        """Stacked hidden states ``[B, L, layers·hidden]``, as the pipeline's ``encode_prompt`` builds them."""
        prompts = list(prompts)
        positive = self._encode(prompts)
        negative = None
        if negative_prompt is not None:
            negative_prompt = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
            negative = self._encode(list(negative_prompt))
        return Conditioning(prompts, positive, negative)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        # text_ids are the same for every row (0, 0, 0, token index): predict rebuilds them from the sequence length.
        embeds, _ = self.pipe.encode_prompt(prompt=prompts, device=self.device,
                                            max_sequence_length=self.max_sequence_length,
                                            text_encoder_out_layers=self.text_encoder_out_layers)
        return {"prompt_embeds": embeds}

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """Flatten the grid into tokens, run the transformer at timestep σ with the 4-d position ids (and [dev]'s
        embedded guidance), fold the output back: the velocity ``ε - x0`` on the latent grid."""
        pipe, dtype = self.pipe, self.pipe.transformer.dtype
        b, c, h, w = x.shape
        prompt_embeds = embeds["prompt_embeds"].to(dtype)
        # The transformer reads the ids of the first row only; every row's ids are the same.
        img_ids = pipe._prepare_latent_ids(x[:1]).to(x.device)
        txt_ids = pipe._prepare_text_ids(prompt_embeds[:1]).to(x.device)
        guidance = None
        if self.embedded_guidance is not None:
            guidance = torch.full((b,), self.embedded_guidance, device=x.device, dtype=torch.float32)
        out = self.forward_module(hidden_states=pipe._pack_latents(x.to(dtype)), timestep=sigma.to(dtype),
                                  guidance=guidance, encoder_hidden_states=prompt_embeds, txt_ids=txt_ids,
                                  img_ids=img_ids, return_dict=False)[0]
        return out[:, :h * w].transpose(1, 2).reshape(b, c, h, w).float()

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The pipeline's grid: ``linspace(1, 1/N, N)`` shifted by the scheduler with the empirical ``mu`` of the
        token count and N, then 0."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        _, h, w = self.latent_shape
        mu = compute_empirical_mu(image_seq_len=h * w, num_steps=num_steps)
        if scheduler.config.get("use_flow_sigmas", False):
            scheduler.set_timesteps(num_steps, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        return scheduler.sigmas.float().to(self.device)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> batch norm undone -> 2x2 unpatchify -> VAE -> RGB ``[B,3,H,W]`` in [0,1], float32."""
        vae = self.pipe.vae
        mean = vae.bn.running_mean.float().view(1, -1, 1, 1).to(x.device)
        std = torch.sqrt(vae.bn.running_var.float().view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x.device)
        latents = self.pipe._unpatchify_latents(x.float() * std + mean).to(vae.dtype)
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)


class Flux2KleinGenerator(_Flux2Generator):
    """FLUX.2 [klein] 4B / 9B, base or step-distilled: double- and single-stream transformer, Qwen3 text encoder."""
    pipeline_class = Flux2KleinPipeline
    family = "FLUX.2 [klein]"
    #: The base checkpoints' CFG default; a step-distilled one gets 4 steps and guidance 1.
    default_guidance = 4.0
    lora_format = ("Flux2KleinPipeline", "transformer")

    def __init__(self, pipe: Flux2KleinPipeline, device: torch.device | str = "cpu", height: int | None = None,
                 width: int | None = None, max_sequence_length: int = 512,
                 text_encoder_out_layers: list[int] | tuple[int, ...] = (9, 18, 27)):
        super().__init__(pipe, device, height, width, max_sequence_length, text_encoder_out_layers)
        self.is_distilled = bool(pipe.config.get("is_distilled", False))
        if self.is_distilled:
            self.default_steps, self.default_guidance = 4, 1.0

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning,
                 guidance: float = 1.0) -> torch.Tensor:
        """Real CFG on the base checkpoints; a step-distilled checkpoint takes none (guidance must be 1)."""
        if self.is_distilled and guidance != 1.0:
            raise FlowalignError(f"{self.family}: this checkpoint is step-distilled (is_distilled), it has no CFG: "
                                 f"set the guidance to 1, got {guidance}")
        return super().velocity(x, sigma, cond, guidance)


class Flux2Generator(_Flux2Generator):
    """FLUX.2 [dev] 32B: guidance-distilled (embedded guidance), Mistral Small 3 text encoder."""
    pipeline_class = Flux2Pipeline
    family = "FLUX.2 [dev]"
    #: guidance 1.0: no real CFG (the distilled guidance is ``embedded_guidance``).
    default_guidance = 1.0
    lora_format = ("Flux2Pipeline", "transformer")

    def __init__(self, pipe: Flux2Pipeline, device: torch.device | str = "cpu", height: int | None = None,
                 width: int | None = None, embedded_guidance: float = 4.0, max_sequence_length: int = 512,
                 text_encoder_out_layers: list[int] | tuple[int, ...] = (10, 20, 30)):
        super().__init__(pipe, device, height, width, max_sequence_length, text_encoder_out_layers)
        if not pipe.transformer.config.guidance_embeds:
            raise FlowalignError(f"{self.family}: the transformer has no guidance embedding (guidance_embeds false)")
        self.embedded_guidance = float(embedded_guidance)
