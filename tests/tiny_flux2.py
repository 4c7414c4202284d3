"""Tiny random FLUX.2 pipelines built offline (diffusers' own test sizes), saved with ``save_pretrained`` so tests load
them back the way a user's checkpoint is loaded: [klein] with a Qwen3 text encoder and the offline Qwen2 tokenizer;
[dev] with a Mistral 3 text encoder and a Pixtral processor around the same tokenizer."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from qwen_tiny import qwen2_tokenizer_offline
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralImageProcessor,
    PixtralProcessor,
    PixtralVisionConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
)

#: Qwen3 hidden size and the encoder layers the tiny pipeline reads (2 layers: hidden states 0, 1, 2).
QWEN_HIDDEN = 16
OUT_LAYERS = (1, 2)
#: Batch-norm statistics of the 4 patchified latent channels: not the identity, so decode must undo them.
BN_MEAN = (0.1, -0.2, 0.3, 0.05)
BN_VAR = (0.5, 2.0, 1.5, 0.8)
#: [dev]'s processor template: messages whose content is a list of text parts (the pipeline's format_input).
MISTRAL_TEMPLATE = ("{% for message in messages %}[{{ message['role'] }}]{% for part in message['content'] %}"
                    "{{ part['text'] }}{% endfor %}[/{{ message['role'] }}]{% endfor %}")
PIXTRAL_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]


def _seeded(make, seed: int = 0):
    """Build a module after ``torch.manual_seed(seed)``, so the random weights are the same every run."""
    torch.manual_seed(seed)
    return make().eval()


def _qwen3(vocab_size: int) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=vocab_size, hidden_size=QWEN_HIDDEN, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=512))


def _vae() -> AutoencoderKLFlux2:
    """Two levels (VAE scale 2), 1 latent channel: 4 channels after the 2x2 patchify, with set BN statistics."""
    vae = AutoencoderKLFlux2(
        sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 4), layers_per_block=1, latent_channels=1,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False)
    vae.bn.running_mean.copy_(torch.tensor(BN_MEAN))
    vae.bn.running_var.copy_(torch.tensor(BN_VAR))
    return vae


def _transformer(guidance_embeds: bool) -> Flux2Transformer2DModel:
    """1 double-stream and 2 single-stream blocks, 4 input channels; text features: QWEN_HIDDEN x 2 layers."""
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=QWEN_HIDDEN * len(OUT_LAYERS), timestep_guidance_channels=32,
        axes_dims_rope=[4, 4, 4, 4], guidance_embeds=guidance_embeds)


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The FLUX.2 checkpoints' scheduler: dynamic exponential shift (mu comes from the pipeline)."""
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096,
                                           time_shift_type="exponential")


def build_tiny_flux2_klein(directory: str | Path, is_distilled: bool = False) -> Path:
    """FLUX.2 [klein]: base (real CFG) or ``is_distilled`` (no CFG); 16x16 images are 4 channels x 4x4 tokens."""
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = qwen2_tokenizer_offline(Path(tmp) / "qwen")
        pipe = Flux2KleinPipeline(
            transformer=_seeded(lambda: _transformer(False)), text_encoder=_seeded(lambda: _qwen3(len(tokenizer))),
            tokenizer=tokenizer, vae=_seeded(_vae), scheduler=_scheduler(), is_distilled=is_distilled)
        pipe.save_pretrained(directory)
    return directory


def _mistral3(vocab_size: int, image_token: int) -> Mistral3ForConditionalGeneration:
    text = MistralConfig(vocab_size=vocab_size, hidden_size=QWEN_HIDDEN, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=512)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=8, image_size=32, patch_size=16)
    return Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision,
                                                           image_token_index=image_token))


def build_tiny_flux2_dev(directory: str | Path) -> Path:
    """FLUX.2 [dev]: the same transformer with guidance embeddings, Mistral 3 (2 layers of width 16) + Pixtral."""
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = qwen2_tokenizer_offline(Path(tmp) / "qwen")
        tokenizer.add_special_tokens({"additional_special_tokens": PIXTRAL_TOKENS})
        processor = PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=tokenizer,
                                     chat_template=MISTRAL_TEMPLATE)
        image_token = tokenizer.convert_tokens_to_ids(PIXTRAL_TOKENS[0])
        pipe = Flux2Pipeline(
            transformer=_seeded(lambda: _transformer(True)), tokenizer=processor, vae=_seeded(_vae),
            text_encoder=_seeded(lambda: _mistral3(len(tokenizer), image_token)), scheduler=_scheduler())
        pipe.save_pretrained(directory)
    return directory
