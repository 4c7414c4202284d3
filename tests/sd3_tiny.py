"""A tiny random SD3 pipeline built offline (diffusers' own SD3 test config), for fast CPU tests."""
from __future__ import annotations

import gzip
import io
import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

CLIP_VOCAB_SIZE = 49408


def build_tiny_sd3(directory: str | Path) -> Path:
    """Build a random tiny SD3 pipeline (32x32 images, latents 4x32x32) and save it into ``directory``."""
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        clip_tokenizer = clip_tokenizer_offline(Path(tmp) / "clip")
        t5_tokenizer = t5_tokenizer_offline(Path(tmp) / "t5")
        pipe = StableDiffusion3Pipeline(
            transformer=_seeded(lambda: SD3Transformer2DModel(
                sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                pooled_projection_dim=64, out_channels=4)),
            text_encoder=_seeded(_tiny_clip), text_encoder_2=_seeded(_tiny_clip),
            text_encoder_3=_seeded(lambda: _tiny_t5(len(t5_tokenizer))),
            tokenizer=clip_tokenizer, tokenizer_2=clip_tokenizer, tokenizer_3=t5_tokenizer,
            vae=_seeded(lambda: AutoencoderKL(
                sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                shift_factor=0.0609, scaling_factor=1.5035)),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        )
        pipe.save_pretrained(directory)
    return directory


def _seeded(make, seed: int = 0):
    """Build a module after ``torch.manual_seed(seed)``, so the random weights are the same every run."""
    torch.manual_seed(seed)
    return make().eval()


def _tiny_clip() -> CLIPTextModelWithProjection:
    """CLIP text encoder with hidden size 32, projection 32, and the real CLIP vocabulary size."""
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        projection_dim=32, hidden_act="gelu", layer_norm_eps=1e-5))


def _tiny_t5(vocab_size: int) -> T5EncoderModel:
    """T5 encoder with d_model 32 (= the transformer's joint_attention_dim)."""
    return T5EncoderModel(T5Config(vocab_size=max(vocab_size, 64), d_model=32, d_ff=37, d_kv=8, num_heads=4,
                                   num_layers=2, relative_attention_num_buckets=8))


def clip_tokenizer_offline(folder: Path) -> CLIPTokenizer:
    """The real CLIP BPE tokenizer, from open_clip's bundled merges file (no download)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def t5_tokenizer_offline(folder: Path) -> T5Tokenizer:
    """A tiny SentencePiece unigram model (64 pieces) trained here, loaded as a T5 tokenizer."""
    import sentencepiece as spm

    text = ["a photo of a cat", "a dog on the grass", "an astronaut riding a horse", "red apple, blue sky",
            "the quick brown fox jumps over the lazy dog"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=64,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    return T5Tokenizer.from_pretrained(folder, extra_ids=0, model_max_length=77)
