"""A tiny random LTX-2 text-to-audio+video pipeline built offline, for fast CPU tests: a 2-layer Gemma 3 text model
(with a 1-layer SigLIP tower, as Gemma3ForConditionalGeneration has) and the offline Qwen2 tokenizer, one-layer
connectors, a 2-block dual-stream transformer (4 video and 4 audio channels), a one-level video VAE (2x spatial
and temporal), a one-level audio VAE (2 latent channels x 2 latent mel bins) and a two-stage vocoder at 16 kHz."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLLTX2Audio,
    AutoencoderKLLTX2Video,
    FlowMatchEulerDiscreteScheduler,
    LTX2Pipeline,
    LTX2VideoTransformer3DModel,
)
from diffusers.pipelines.ltx2 import LTX2TextConnectors
from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
from qwen_tiny import qwen2_tokenizer_offline
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

GEMMA_HIDDEN, GEMMA_LAYERS = 16, 2


def build_tiny_ltx2(directory: str | Path) -> Path:
    """Build the tiny pipeline (32x32 video -> 16x16 latents, 5 frames -> 3 latent frames) and save it."""
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = qwen2_tokenizer_offline(Path(tmp) / "tokenizer")
        audio_vae = _seeded(_audio_vae)
        pipe = LTX2Pipeline(
            transformer=_seeded(_transformer), vae=_seeded(_video_vae), audio_vae=audio_vae,
            scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=_seeded(lambda: _gemma3(len(tokenizer))),
            tokenizer=tokenizer, connectors=_seeded(_connectors),
            vocoder=_seeded(lambda: _vocoder(audio_vae.config.output_channels * audio_vae.config.mel_bins)))
        pipe.save_pretrained(directory)
    return directory


def _seeded(make, seed: int = 0):
    """Build a module after ``torch.manual_seed(seed)``, so the random weights are the same every run."""
    torch.manual_seed(seed)
    return make().eval()


def _gemma3(vocab_size: int) -> Gemma3ForConditionalGeneration:
    text = {"vocab_size": vocab_size, "hidden_size": GEMMA_HIDDEN, "intermediate_size": 32,
            "num_hidden_layers": GEMMA_LAYERS, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
            "sliding_window": 8, "pad_token_id": 0}
    vision = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 8, "patch_size": 4}
    return Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                                       image_token_index=vocab_size - 1))


def _transformer() -> LTX2VideoTransformer3DModel:
    return LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, qk_norm="rms_norm_across_heads",
        caption_channels=GEMMA_HIDDEN, rope_double_precision=False, rope_type="split")


def _connectors() -> LTX2TextConnectors:
    return LTX2TextConnectors(
        caption_channels=GEMMA_HIDDEN, text_proj_in_factor=GEMMA_LAYERS + 1, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32, rope_theta=10000.0,
        rope_double_precision=False, causal_temporal_positioning=False, rope_type="split")


def _video_vae() -> AutoencoderKLLTX2Video:
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), decoder_block_out_channels=(8,),
        layers_per_block=(1,), decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False), downsample_type=("spatial",),
        upsample_residual=(False,), upsample_factor=(1,), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False)
    with torch.no_grad():  # not the identity, so the adapter's denormalisation is checked
        vae.latents_mean.copy_(torch.linspace(-0.2, 0.2, 4))
        vae.latents_std.copy_(torch.linspace(0.5, 1.5, 4))
    return vae


def _audio_vae() -> AutoencoderKLLTX2Audio:
    vae = AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8)
    with torch.no_grad():
        vae.latents_mean.copy_(torch.linspace(-0.1, 0.1, vae.latents_mean.numel()))
        vae.latents_std.copy_(torch.linspace(0.8, 1.2, vae.latents_std.numel()))
    return vae


def _vocoder(in_channels: int) -> LTX2Vocoder:
    return LTX2Vocoder(in_channels=in_channels, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4],
                       upsample_factors=[2, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]],
                       leaky_relu_negative_slope=0.1, output_sampling_rate=16000)
