"""Tiny random FLUX.1, Wan 2.1 / 2.2 and Stable Audio Open pipelines built offline (diffusers' own test
configs), saved with ``save_pretrained`` so tests load them back the way a user's checkpoint is loaded."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    AutoencoderOobleck,
    CosineDPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableAudioDiTModel,
    StableAudioPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.pipelines.stable_audio import StableAudioProjectionModel
from sd3_tiny import clip_tokenizer_offline, t5_tokenizer_offline
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel


def _seeded(make, seed: int = 0):
    """Build a module after ``torch.manual_seed(seed)``, so the random weights are the same every run."""
    torch.manual_seed(seed)
    return make().eval()


def _t5(vocab_size: int) -> T5EncoderModel:
    """T5 encoder with d_model 32 (diffusers' tiny-random-t5 sizes)."""
    return T5EncoderModel(T5Config(vocab_size=max(vocab_size, 64), d_model=32, d_ff=37, d_kv=8, num_heads=4,
                                   num_layers=2, relative_attention_num_buckets=8))


def _umt5(vocab_size: int) -> UMT5EncoderModel:
    """UMT5 encoder (Wan's text encoder class) with the same tiny sizes."""
    return UMT5EncoderModel(UMT5Config(vocab_size=max(vocab_size, 64), d_model=32, d_ff=37, d_kv=8, num_heads=4,
                                       num_layers=2, relative_attention_num_buckets=8))


def build_tiny_flux(directory: str | Path, guidance_embeds: bool = True) -> Path:
    """FLUX.1 (``guidance_embeds=True``: the guidance-distilled dev variant), VAE scale 1, 1 latent channel."""
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        clip_tok, t5_tok = clip_tokenizer_offline(Path(tmp) / "clip"), t5_tokenizer_offline(Path(tmp) / "t5")
        pipe = FluxPipeline(
            transformer=_seeded(lambda: FluxTransformer2DModel(
                patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                guidance_embeds=guidance_embeds)),
            text_encoder=_seeded(lambda: CLIPTextModel(CLIPTextConfig(
                vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32,
                intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, hidden_act="gelu",
                projection_dim=32, layer_norm_eps=1e-5))),
            text_encoder_2=_seeded(lambda: _t5(len(t5_tok))), tokenizer=clip_tok, tokenizer_2=t5_tok,
            vae=_seeded(lambda: AutoencoderKL(
                sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                shift_factor=0.0609, scaling_factor=1.5035)),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                      max_shift=1.15, base_image_seq_len=256,
                                                      max_image_seq_len=4096),
        )
        pipe.save_pretrained(directory)
    return directory


def _wan_transformer() -> WanTransformer3DModel:
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                 out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def build_tiny_wan(directory: str | Path, two_experts: bool = False) -> Path:
    """Wan 2.1 (one transformer), or Wan 2.2 A14B-style (``two_experts``: + transformer_2, boundary_ratio 0.875)."""
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        t5_tok = t5_tokenizer_offline(Path(tmp) / "t5")
        pipe = WanPipeline(
            transformer=_seeded(_wan_transformer),
            transformer_2=_seeded(_wan_transformer, seed=1) if two_experts else None,
            boundary_ratio=0.875 if two_experts else None,
            text_encoder=_seeded(lambda: _umt5(len(t5_tok))), tokenizer=t5_tok,
            vae=_seeded(lambda: AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                                 temperal_downsample=[False, True, True])),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        )
        pipe.save_pretrained(directory)
    return directory


def build_tiny_stable_audio(directory: str | Path) -> Path:
    """Stable Audio Open: DiT over 4 latent steps x 3 channels, Oobleck VAE (2 channels, 4 Hz), T5 + projection."""
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        t5_tok = t5_tokenizer_offline(Path(tmp) / "t5")
        t5_tok.model_max_length = 25
        text_encoder = _seeded(lambda: _t5(len(t5_tok)))
        pipe = StableAudioPipeline(
            transformer=_seeded(lambda: StableAudioDiTModel(
                sample_size=4, in_channels=3, num_layers=2, attention_head_dim=4, num_key_value_attention_heads=2,
                out_channels=3, cross_attention_dim=4, time_proj_dim=8, global_states_input_dim=8,
                cross_attention_input_dim=4)),
            vae=_seeded(lambda: AutoencoderOobleck(
                encoder_hidden_size=6, downsampling_ratios=[1, 2], decoder_channels=3, decoder_input_channels=3,
                audio_channels=2, channel_multiples=[2, 4], sampling_rate=4)),
            text_encoder=text_encoder, tokenizer=t5_tok,
            projection_model=_seeded(lambda: StableAudioProjectionModel(
                text_encoder_dim=text_encoder.config.d_model, conditioning_dim=4, min_value=0, max_value=32)),
            scheduler=CosineDPMSolverMultistepScheduler(solver_order=2, prediction_type="v_prediction",
                                                        sigma_data=1.0, sigma_schedule="exponential"),
        )
        pipe.save_pretrained(directory)
    return directory
