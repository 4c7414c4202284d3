"""An offline Qwen2 tokenizer (a byte-level BPE trained here on a few sentences) for the tiny Qwen-Image, Z-Image and
FLUX.2 [klein] pipelines, whose text encoders are Qwen models; it carries a chat template, as those pipelines use."""
from __future__ import annotations

from pathlib import Path

from transformers import Qwen2Tokenizer

#: The special tokens the pipelines' prompt templates name.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<think>", "</think>"]
#: A minimal ChatML template (the Qwen models' format): each message wrapped in im_start / im_end.
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["a photo of a cat", "a dog on the grass", "an astronaut riding a horse", "red apple, blue sky",
          "the quick brown fox jumps over the lazy dog", "Describe the image by detailing the color, shape, size",
          "system user assistant", 'a sign that says "hello world"'] * 20


def qwen2_tokenizer_offline(folder: str | Path, vocab_size: int = 400) -> Qwen2Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` tokens here, save it in the Qwen2 tokenizer layout, load it back."""
    from tokenizers import ByteLevelBPETokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                            show_progress=False)
    bpe.save_model(str(folder))  # vocab.json + merges.txt: the files Qwen2Tokenizer reads
    tokenizer = Qwen2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=512,
                               errors="replace", unk_token=None, bos_token=None, eos_token="<|endoftext|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return Qwen2Tokenizer.from_pretrained(folder)
