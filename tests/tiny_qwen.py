"""A tiny random Qwen-Image pipeline built offline (the sizes of diffusers' own QwenImage test components), saved
with ``save_pretrained`` so tests load it back the way a user's checkpoint is loaded."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from qwen_tiny import qwen2_tokenizer_offline
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

#: Qwen-Image's scheduler (exponential time shift, shift_terminal 0.02), but with base and max shift apart so the
#: dynamic shift depends on the image size (the real checkpoint has both at log 3).
SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": math.log(3),
             "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02, "time_shift_type": "exponential",
             "use_dynamic_shifting": True}


def _seeded(make, seed: int = 0):
    """Build a module after ``torch.manual_seed(seed)``, so the random weights are the same every run."""
    torch.manual_seed(seed)
    return make().eval()


def _text_encoder(tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL with a 16-wide, 2-layer language model and a 1-block vision tower (unused by the pipeline)."""
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6},
                     "bos_token_id": None, "eos_token_id": ids("<|endoftext|>"), "pad_token_id": ids("<|endoftext|>")},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16,
                       "fullatt_block_indexes": [0]},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|image_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    return Qwen2_5_VLForConditionalGeneration(config)


def build_tiny_qwen_image(directory: str | Path) -> Path:
    """Qwen-Image: VAE scale 4 with 4 latent channels (non-trivial latents_mean / std), 2x2-patch MMDiT, 1 layer."""
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = qwen2_tokenizer_offline(Path(tmp) / "qwen2")
        pipe = QwenImagePipeline(
            transformer=_seeded(lambda: QwenImageTransformer2DModel(
                patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))),
            vae=_seeded(lambda: AutoencoderKLQwenImage(
                base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
                latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0])),
            text_encoder=_seeded(lambda: _text_encoder(tokenizer)), tokenizer=tokenizer,
            scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        )
        pipe.save_pretrained(directory)
    return directory
