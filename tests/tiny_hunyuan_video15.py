"""A tiny random HunyuanVideo 1.5 text-to-video pipeline built offline, for fast CPU tests: a 3-layer Qwen2.5-VL
text model with the offline Qwen2 tokenizer, a 1-layer T5 glyph encoder with the byte-level ByT5 tokenizer, a
1-block transformer and a two-level causal VAE (4x spatial, 4x temporal compression, 4 latent channels)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo15,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
)
from diffusers.guiders import ClassifierFreeGuidance
from qwen_tiny import qwen2_tokenizer_offline
from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

LATENT_CHANNELS = 4
QWEN_HIDDEN = 16
BYT5_HIDDEN = 32


def build_tiny_hunyuan_video15(directory: str | Path, guidance_scale: float = 6.0) -> Path:
    """Build the tiny pipeline (16x16 video -> 4x4 latents, 9 frames -> 3 latent frames) and save it."""
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = qwen2_tokenizer_offline(Path(tmp) / "qwen")
        pipe = HunyuanVideo15Pipeline(
            transformer=_seeded(_tiny_transformer), vae=_seeded(_tiny_vae),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),  # the 480p model's flow shift
            text_encoder=_seeded(lambda: _tiny_qwen(len(tokenizer))), tokenizer=tokenizer,
            text_encoder_2=_seeded(_tiny_byt5), tokenizer_2=ByT5Tokenizer(),
            guider=ClassifierFreeGuidance(guidance_scale=guidance_scale))
        pipe.save_pretrained(directory)
    return directory


def _seeded(make, seed: int = 0):
    """Build a module after ``torch.manual_seed(seed)``, so the random weights are the same every run."""
    torch.manual_seed(seed)
    return make().eval()


def _tiny_transformer() -> HunyuanVideo15Transformer3DModel:
    """One dual-stream block, 2 heads of 8; input = latents + zero image-condition latents + mask (2·4+1)."""
    return HunyuanVideo15Transformer3DModel(
        in_channels=2 * LATENT_CHANNELS + 1, out_channels=LATENT_CHANNELS, num_attention_heads=2, attention_head_dim=8,
        num_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=QWEN_HIDDEN,
        text_embed_2_dim=BYT5_HIDDEN, image_embed_dim=8, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v")


def _tiny_vae() -> AutoencoderKLHunyuanVideo15:
    return AutoencoderKLHunyuanVideo15(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(16, 16), layers_per_block=1,
        spatial_compression_ratio=4, temporal_compression_ratio=4, downsample_match_channel=False,
        upsample_match_channel=False, scaling_factor=0.75)


def _tiny_qwen(vocab_size: int) -> Qwen2_5_VLTextModel:
    """Three layers, so the pipeline's third-from-last hidden state comes out of a real layer."""
    return Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=vocab_size, hidden_size=QWEN_HIDDEN, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]}))


def _tiny_byt5() -> T5EncoderModel:
    """A T5 encoder over ByT5's 384 byte-level tokens, d_model = the transformer's ``text_embed_2_dim``."""
    return T5EncoderModel(T5Config(vocab_size=384, d_model=BYT5_HIDDEN, d_ff=37, d_kv=8, num_heads=4, num_layers=1,
                                   relative_attention_num_buckets=8))
