"""A tiny random Z-Image pipeline built offline (the real architecture at hidden sizes 16-32): a 2-layer Qwen3 text
encoder with the offline Qwen2 tokenizer and its chat template, the single-stream S3-DiT and a one-block VAE, saved
with ``save_pretrained`` so tests load it back the way a user's checkpoint is loaded."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from qwen_tiny import qwen2_tokenizer_offline
from transformers import Qwen3Config, Qwen3Model

#: The text encoder's hidden size (the transformer's ``cap_feat_dim``).
TEXT_DIM = 16


def _seeded(make, seed: int = 0):
    """Build a module after ``torch.manual_seed(seed)``, so the random weights are the same every run."""
    torch.manual_seed(seed)
    return make().eval()


def _qwen3(vocab_size: int) -> Qwen3Model:
    """Qwen3 with 2 layers (the pipeline takes the second-to-last hidden state), hidden size 16."""
    return Qwen3Model(Qwen3Config(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                  max_position_embeddings=512, rope_theta=10000.0))


def _transformer() -> ZImageTransformer2DModel:
    """S3-DiT, dim 32 with 2 heads of 16 = the RoPE axes 4 + 6 + 6; 1 main layer and 1 noise / context refiner."""
    return ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1,
                                    n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=TEXT_DIM,
                                    axes_dims=[4, 6, 6], axes_lens=[256, 32, 32])


def build_tiny_z_image(directory: str | Path) -> Path:
    """Z-Image with VAE scale 1 and 4 latent channels (a 16x16 image is an 8x8 grid of 2x2 patches) and the
    scheduler with a static shift of 3 (no dynamic shifting)."""
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = qwen2_tokenizer_offline(Path(tmp) / "qwen")
        pipe = ZImagePipeline(
            transformer=_seeded(_transformer),
            text_encoder=_seeded(lambda: _qwen3(len(tokenizer))), tokenizer=tokenizer,
            vae=_seeded(lambda: AutoencoderKL(
                sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                shift_factor=0.1159, scaling_factor=0.3611)),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        )
        _randomize_zero_inits(pipe.transformer)
        pipe.save_pretrained(directory)
    return directory


@torch.no_grad()
def _randomize_zero_inits(transformer: ZImageTransformer2DModel) -> None:
    """The pad tokens start at zero; small random values make a wrong caption / image padding visible."""
    torch.manual_seed(1)
    for pad in (transformer.x_pad_token, transformer.cap_pad_token):
        pad.normal_(0.0, 0.5)
