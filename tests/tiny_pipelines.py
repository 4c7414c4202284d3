"""Tiny random SD 1.5 / SD 2.x (v-prediction) / SDXL pipelines built offline (diffusers' own test configs)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from sd3_tiny import CLIP_VOCAB_SIZE, _seeded, clip_tokenizer_offline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

#: SD's noise schedule (SD 1.5, 2.x and XL share it).
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def build_tiny_sd(directory: str | Path, prediction_type: str = "epsilon") -> Path:
    """SD 1.5 (ε, its PNDM scheduler) or, with ``prediction_type="v_prediction"``, SD 2.x (its DDIM scheduler).

    32x32 images, latents 4x16x16."""
    if prediction_type == "epsilon":
        scheduler = PNDMScheduler(**SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False)
    else:
        scheduler = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False,
                                  prediction_type=prediction_type)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = StableDiffusionPipeline(
            unet=_seeded(lambda: UNet2DConditionModel(
                block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8, norm_num_groups=2)),
            scheduler=scheduler, vae=_seeded(_tiny_vae),
            text_encoder=_seeded(lambda: CLIPTextModel(_clip_config(hidden=8, heads=2))),
            tokenizer=clip_tokenizer_offline(Path(tmp) / "clip"),
            safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
        pipe.save_pretrained(directory)
    return Path(directory)


def build_tiny_sdxl(directory: str | Path) -> Path:
    """SDXL: two CLIP encoders (the second with a projection), ``text_time`` conditioning, Euler scheduler.

    32x32 images, latents 4x16x16."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer_offline(Path(tmp) / "clip")
        pipe = StableDiffusionXLPipeline(
            unet=_seeded(lambda: UNet2DConditionModel(
                block_out_channels=(2, 4), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
                cross_attention_dim=64, norm_num_groups=1)),
            scheduler=EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading"),
            vae=_seeded(_tiny_vae),
            text_encoder=_seeded(lambda: CLIPTextModel(_clip_config(hidden=32, heads=4))),
            text_encoder_2=_seeded(lambda: CLIPTextModelWithProjection(_clip_config(hidden=32, heads=4)), seed=1),
            tokenizer=tokenizer, tokenizer_2=tokenizer, image_encoder=None, feature_extractor=None,
            force_zeros_for_empty_prompt=True, add_watermarker=False)
        pipe.save_pretrained(directory)
    return Path(directory)


def _tiny_vae() -> AutoencoderKL:
    """SD's test VAE: two blocks (latents at 1/2 the image size), 4 latent channels."""
    return AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, norm_num_groups=2)


def _clip_config(hidden: int, heads: int) -> CLIPTextConfig:
    """A small CLIP text config over the real CLIP vocabulary (projection = hidden size)."""
    return CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                          hidden_size=hidden, intermediate_size=37, num_attention_heads=heads, num_hidden_layers=2,
                          projection_dim=hidden, hidden_act="gelu", layer_norm_eps=1e-5)
