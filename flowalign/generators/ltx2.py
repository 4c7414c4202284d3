"""LTX-2 text-to-audio+video behind the Generator interface, wrapping a diffusers ``LTX2Pipeline``.

One sample is a clip and its soundtrack, denoised together by LTX-2's dual-stream transformer. The sampling state
is the pipeline's packed tokens, video first: ``[Nv + Na, D]`` where ``Nv`` = latent frames x height x width (the
video VAE's normalised latents) and ``Na`` = the audio latent's length (its normalised ``channels x mel bins``
per token); both streams have ``D`` features (128 in the released checkpoints). The transformer's output at
timestep σ·1000 is the velocity ``ε - x0`` of each stream, and one Euler step moves both, as the pipeline's two
schedulers do.

Prompts: ``encode`` is the pipeline's: the Gemma 3 text model's hidden states of every layer (left-padded to
``max_sequence_length``) through the text connectors, which give the video and the audio stream their own
embeddings and one attention mask; the connectors run once per branch here and are not trained.

Guidance, as the pipeline combines it in x0 space (x0 = x - σ·v) for each stream: classifier-free guidance
(``guidance`` for the video, ``audio_guidance_scale`` for the audio), spatio-temporal guidance (a pass with
self-attention skipped in ``stg_blocks``; ``stg_scale`` / ``audio_stg_scale``), modality-isolation guidance (a
pass without the audio<->video cross-attention; ``modality_scale`` / ``audio_modality_scale``), then each stream
rescaled towards its conditional prediction (``guidance_rescale`` / ``audio_guidance_rescale``). A scale of
``guidance`` = 1 turns every term off (one conditional pass), as the methods that train the conditional velocity
need; the defaults are the pipeline's.

Grid: ``linspace(1, 1/N, N)`` through the scheduler's (dynamic) shift for the video's token count, then 0.

Decode: video tokens unpacked and denormalised (the VAE's latents mean / std and scaling factor) -> VAE (decode
timestep 0, the pipeline's default) -> ``[B, F, 3, H, W]`` in [0, 1]; audio tokens denormalised and unpacked ->
audio VAE -> mel spectrogram -> vocoder -> ``[B, C, L]`` in [-1, 1] at the vocoder's rate; both in one
``AudioVideo``, whose video a video reward scores, whose audio an audio reward scores.

LoRA: the attention projections of both streams and of their cross-attention, saved with ``LTX2Pipeline``'s
``save_lora_weights``, which its ``load_lora_weights`` reads back.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LTX2Pipeline
from diffusers.pipelines.ltx2.pipeline_ltx2 import calculate_shift, rescale_noise_cfg
from diffusers.pipelines.ltx2.utils import conditioning_frame_rate
from torch import nn

from ..errors import FlowalignError
from ..rewards.media import AudioVideo
from .base import Conditioning
from .pipeline import PipelineGenerator

EMBED_NAMES = ("video_embeds", "audio_embeds", "attention_mask")


class LTX2Generator(PipelineGenerator):
    """LTX-2 (and 2.3) text-to-audio+video: a dual-stream DiT over packed video and audio tokens, Gemma 3 text."""
    pipeline_class = LTX2Pipeline
    family = "LTX-2"

    modality = "audio_video"
    #: ``LTX2Pipeline.__call__``'s steps and video CFG scale.
    default_steps = 30
    default_guidance = 3.0
    #: The attention projections of the video and audio streams and of their cross-attention (LTX-2's trainer).
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    lora_format = ("LTX2Pipeline", "transformer")

    def __init__(self, pipe: LTX2Pipeline, device: torch.device | str = "cpu", height: int = 512, width: int = 768,
                 num_frames: int = 121, frame_rate: float = 24.0, motion_speed: float = 1.0,
                 max_sequence_length: int = 1024, audio_guidance_scale: float = 7.0, stg_scale: float = 1.0,
                 audio_stg_scale: float = 1.0, stg_blocks: list[int] | tuple[int, ...] = (28,),
                 modality_scale: float = 3.0, audio_modality_scale: float = 3.0, guidance_rescale: float = 0.7,
                 audio_guidance_rescale: float = 0.7, use_cross_timestep: bool = True):
        self.pipe = pipe.to(device)
        for module in (pipe.transformer, pipe.vae, pipe.audio_vae, pipe.text_encoder, pipe.connectors, pipe.vocoder):
            module.eval().requires_grad_(False)
        self._device = torch.device(device)
        self._check_size(height, width, num_frames, frame_rate, motion_speed, max_sequence_length)
        self.height, self.width, self.num_frames, self.frame_rate = height, width, num_frames, frame_rate
        self.fps = conditioning_frame_rate(frame_rate, motion_speed)
        self.max_sequence_length = max_sequence_length
        self.video_scales = (stg_scale, modality_scale, guidance_rescale)
        self.audio_scales = (audio_guidance_scale, audio_stg_scale, audio_modality_scale, audio_guidance_rescale)
        self.stg_blocks = [int(b) for b in stg_blocks]
        self.use_cross_timestep = use_cross_timestep
        self.num_train_timesteps = pipe.scheduler.config.num_train_timesteps
        self._grid_sizes()

    def _check_size(self, height: int, width: int, num_frames: int, frame_rate: float, motion_speed: float,
                    max_sequence_length: int) -> None:
        pipe = self.pipe
        spatial = pipe.vae_spatial_compression_ratio * pipe.transformer_spatial_patch_size
        temporal = pipe.vae_temporal_compression_ratio * pipe.transformer_temporal_patch_size
        if height % spatial or width % spatial or min(height, width) < spatial:
            raise FlowalignError(f"LTX-2: height and width must both be positive multiples of {spatial}, "
                                 f"got {height}x{width}")
        if num_frames < 1 or (num_frames - 1) % temporal:
            raise FlowalignError(f"LTX-2: num_frames - 1 must be a multiple of {temporal}, got {num_frames}")
        if not (frame_rate > 0 and motion_speed > 0 and max_sequence_length >= 1):
            raise FlowalignError(f"LTX-2: frame_rate and motion_speed must be > 0 and max_sequence_length >= 1, got "
                                 f"{frame_rate}, {motion_speed}, {max_sequence_length}")

    def _grid_sizes(self) -> None:
        """The latent grid of each stream and the token counts of the packed state (the pipeline's arithmetic)."""
        pipe = self.pipe
        self.latent_frames = (self.num_frames - 1) // pipe.vae_temporal_compression_ratio + 1
        self.latent_height = self.height // pipe.vae_spatial_compression_ratio
        self.latent_width = self.width // pipe.vae_spatial_compression_ratio
        per_second = pipe.audio_sampling_rate / pipe.audio_hop_length / float(pipe.audio_vae_temporal_compression_ratio)
        self.audio_frames = round(self.num_frames / self.frame_rate * per_second)
        self.mel_bins = pipe.audio_vae.config.mel_bins // pipe.audio_vae_mel_compression_ratio
        p, pt = pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size
        self.video_tokens = self.latent_frames // pt * (self.latent_height // p) * (self.latent_width // p)
        features = pipe.transformer.config.in_channels * pt * p * p
        audio_features = pipe.audio_vae.config.latent_channels * self.mel_bins
        if features != audio_features or self.audio_frames < 1:
            raise FlowalignError(f"LTX-2: the video and audio tokens must have one width and the clip some audio, got "
                                 f"{features} and {audio_features} features, {self.audio_frames} audio latent frames")
        self.features = features

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.video_tokens + self.audio_frames, self.features)

    @property
    def sample_rate(self) -> int:
        return int(self.pipe.vocoder.config.output_sampling_rate)

    @property
    def trainable_module(self) -> nn.Module:
        return self.pipe.transformer

    # ------------------------------------------------------------------ prompts

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompt: str | list[str] | None = "") -> Conditioning:
        """Gemma 3 hidden states through the connectors for the prompts and, unless None, the negatives."""
        prompts = list(prompts)
        positive = self._encode(prompts)
        if negative_prompt is None:
            return Conditioning(prompts, positive)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise FlowalignError(f"LTX-2: {len(negatives)} negative prompts for {len(prompts)} prompts")
        return Conditioning(prompts, positive, self._encode(negatives))

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        pipe = self.pipe
        embeds, mask = pipe.encode_prompt(texts, do_classifier_free_guidance=False, device=self.device,
                                          max_sequence_length=self.max_sequence_length)[:2]
        padding_side = getattr(pipe.tokenizer, "padding_side", "left")
        video, audio, mask = pipe.connectors(embeds, mask, padding_side=padding_side)
        return dict(zip(EMBED_NAMES, (video, audio, mask)))

    # ------------------------------------------------------------------ the model

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed state's video tokens ``[B, Nv, D]`` and audio tokens ``[B, Na, D]``."""
        return x[:, :self.video_tokens], x[:, self.video_tokens:]

    def _streams(self, x: torch.Tensor, sigma: torch.Tensor, embeds: dict[str, torch.Tensor],
                 isolate: bool = False, stg_blocks: list[int] | None = None) -> torch.Tensor:
        """One transformer pass: both streams' velocities, packed like ``x`` (float32)."""
        dtype = self.pipe.transformer.dtype
        video, audio = (t.to(dtype) for t in self.split(x))
        batch, rope = x.shape[0], self.pipe.transformer
        timestep = sigma.float() * self.num_train_timesteps
        mask = embeds["attention_mask"]
        v_video, v_audio = self.forward_module(
            hidden_states=video, audio_hidden_states=audio, encoder_hidden_states=embeds["video_embeds"].to(dtype),
            audio_encoder_hidden_states=embeds["audio_embeds"].to(dtype), timestep=timestep, sigma=timestep,
            encoder_attention_mask=mask, audio_encoder_attention_mask=mask, num_frames=self.latent_frames,
            height=self.latent_height, width=self.latent_width, fps=self.fps, audio_num_frames=self.audio_frames,
            video_coords=rope.rope.prepare_video_coords(batch, self.latent_frames, self.latent_height,
                                                        self.latent_width, x.device, fps=self.fps),
            audio_coords=rope.audio_rope.prepare_audio_coords(batch, self.audio_frames, x.device),
            isolate_modalities=isolate, spatio_temporal_guidance_blocks=stg_blocks, perturbation_mask=None,
            use_cross_timestep=self.use_cross_timestep, return_dict=False)
        return torch.cat([v_video.float(), v_audio.float()], dim=1)

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """Both streams' velocities at timesteps σ·1000 (no guidance)."""
        return self._streams(x, sigma, embeds)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning,
                 guidance: float = 1.0) -> torch.Tensor:
        """LTX-2's guidance (module docstring) with the video CFG scale ``guidance``; 1 is one conditional pass."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        if math.isclose(guidance, 1.0) or cond.negative is None:
            return self.predict(x, sigma, cond.positive)
        both = {k: torch.cat([cond.negative[k], cond.positive[k]]) for k in cond.positive}
        s = sigma.view(-1, 1, 1)
        v_uncond, v_cond = self._streams(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        x0_cond = x - s * v_cond
        terms = [((guidance, self.audio_scales[0]), x - s * v_uncond, 1.0)]  # (scales, x0 of the pass, offset)
        (stg, audio_stg), (modality, audio_modality) = (self.video_scales[0], self.audio_scales[1]), \
            (self.video_scales[1], self.audio_scales[2])
        if stg > 0 or audio_stg > 0:
            terms.append(((stg, audio_stg), x - s * self._streams(x, sigma, cond.positive, stg_blocks=self.stg_blocks),
                          0.0))
        if modality > 1 or audio_modality > 1:
            terms.append(((modality, audio_modality), x - s * self._streams(x, sigma, cond.positive, isolate=True),
                          1.0))
        guided = [self._guided(i, x0_cond, terms, rescale) for i, rescale in
                  enumerate((self.video_scales[2], self.audio_scales[3]))]
        return (x - torch.cat(guided, dim=1)) / s

    def _guided(self, stream: int, x0_cond: torch.Tensor, terms: list, rescale: float) -> torch.Tensor:
        """One stream's guided x0: the conditional one plus (scale - offset)·(x0_cond - x0_pass) for each extra
        pass, rescaled towards the conditional one."""
        cond = self.split(x0_cond)[stream]
        guided = cond + sum((scales[stream] - offset) * (cond - self.split(x0)[stream]) for scales, x0, offset in terms)
        return rescale_noise_cfg(guided, cond, guidance_rescale=rescale) if rescale > 0 else guided

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The pipeline's grid: ``linspace(1, 1/N, N)`` shifted (dynamically, by the video's token count), then 0."""
        scheduler = self.pipe.scheduler
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise FlowalignError(f"LTX-2: expected a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")
        config = scheduler.config
        mu = calculate_shift(self.video_tokens, config.get("base_image_seq_len", 1024),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.95),
                             config.get("max_shift", 2.05))
        fresh = FlowMatchEulerDiscreteScheduler.from_config(config)
        fresh.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        return fresh.sigmas.float().to(self.device)

    # ------------------------------------------------------------------ media

    def decode(self, x: torch.Tensor) -> AudioVideo:
        """Packed tokens -> the clips ``[B, F, 3, H, W]`` in [0, 1] and their audio ``[B, C, L]`` in [-1, 1]."""
        return AudioVideo(self._decode_video(self.split(x)[0]), self._decode_audio(self.split(x)[1]),
                          self.sample_rate)

    def _decode_video(self, tokens: torch.Tensor) -> torch.Tensor:
        pipe, vae = self.pipe, self.pipe.vae
        latents = pipe._unpack_latents(tokens.float(), self.latent_frames, self.latent_height, self.latent_width,
                                       pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size)
        latents = pipe._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        timestep = latents.new_zeros(latents.shape[0]).to(vae.dtype) if vae.config.timestep_conditioning else None
        video = vae.decode(latents.to(vae.dtype), timestep, return_dict=False)[0]  # [B, 3, F, H, W] in [-1, 1]
        return (video.float().permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1)

    def _decode_audio(self, tokens: torch.Tensor) -> torch.Tensor:
        pipe, vae = self.pipe, self.pipe.audio_vae
        latents = pipe._denormalize_audio_latents(tokens.float(), vae.latents_mean, vae.latents_std)
        latents = pipe._unpack_audio_latents(latents, self.audio_frames, num_mel_bins=self.mel_bins)
        mel = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return pipe.vocoder(mel.to(next(pipe.vocoder.parameters()).dtype)).float().clamp(-1, 1)
