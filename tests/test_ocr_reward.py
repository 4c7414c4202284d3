"""The OCR reward: Flow-GRPO's edit-distance rule by hand, target extraction, and a tiny random TrOCR (ViT encoder,
TrOCR decoder, byte-level BPE tokenizer trained here) saved in trocr-base-printed's file layout, loaded back through
``rewards.load("ocr", ...)`` and checked against transformers' own image processor and greedy ``generate``."""
from __future__ import annotations

import json

import pytest
import torch

from flowalign import rewards
from flowalign.rewards import RewardError
from flowalign.rewards.ocr import levenshtein, ocr_reward, target_text

SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids 0..4: bos, pad, eos, unk, mask
CORPUS = ["hello world", "open 24 hours", 'a neon sign that says "hello"', "FLOW GRPO", "coffee shop"] * 10


@pytest.mark.parametrize("recognised, target, expected", [
    ("helo", "hello", 1 - 1 / 5),          # one deletion
    ("jello", "hello", 1 - 1 / 5),         # one substitution
    ("hlelo", "hello", 1 - 2 / 5),         # a swap is two edits
    ("xxhelloxx", "hello", 1.0),           # the target occurs in the text: distance 0
    ("", "hello", 0.0),                    # nothing read: distance 5 = len
    ("abcdefghijkl", "hello", 0.0),        # distance above len(target) is capped at len
    ("HeLLo  World", "hello world", 1.0),  # case and spaces ignored
    ("hello", "Hello World", 1 - 5 / 10),  # target "helloworld": five insertions
])
def test_edit_distance_rule_by_hand(recognised, target, expected):
    assert ocr_reward(recognised, target) == pytest.approx(expected)


def test_levenshtein_by_hand():
    assert levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "") == 3 and levenshtein("flaw", "lawn") == 2


def test_target_text_from_prompts_and_metadata():
    assert target_text('a neon sign that says "Open 24 Hours" at night', {}) == "Open 24 Hours"
    assert target_text('the word "cat" next to the word "dog"', {}) == "cat"  # the first pair
    assert target_text("a sign reading “Café”", {}) == "Café"
    assert target_text('a sign "hello"', {"text": "bye"}) == "bye"  # metadata wins
    assert target_text('a sign "hello"', {"text": "bye", "ocr_text": "ciao"}) == "ciao"
    for prompt in ["a cat", 'an open quote "only', 'empty quotes ""', 'spaces "   "']:
        assert target_text(prompt, {}) is None, prompt


def save_legacy_tokenizer(folder) -> None:
    """trocr-base-printed's tokenizer files: RoBERTa byte-level BPE ``vocab.json`` + ``merges.txt`` and a
    ``tokenizer_config.json`` naming the class (trained here on a few sentences: no download)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, special_tokens=SPECIAL, show_progress=False)
    bpe.save_model(str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "RobertaTokenizer",
                                                              "model_max_length": 512}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>", "pad_token": "<pad>",
         "cls_token": "<s>", "mask_token": "<mask>"}))


@pytest.fixture(scope="module")
def trocr_dir(tmp_path_factory):
    """A tiny TrOCR (ViT hidden 16 -> TrOCR decoder d_model 32, one layer each, 32 px, patch 16) with the real
    checkpoint's files: ``config.json`` + ``model.safetensors`` (save_pretrained), the legacy
    ``preprocessor_config.json`` (size as one int, bilinear, mean = std = 0.5) and the RoBERTa tokenizer files.
    EOS, BOS and PAD are made unreachable (the last layer norm pins hidden unit 0 to 1; their output rows weigh it
    -100) so greedy decoding reads ``max_new_tokens`` ordinary tokens, never an empty string; weights drawn at std 1
    so the text read differs from image to image."""
    from transformers import TrOCRConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    folder = tmp_path_factory.mktemp("trocr")
    save_legacy_tokenizer(folder)
    vocab = len(json.loads((folder / "vocab.json").read_text()))
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
         "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2, "size": 32,
         "processor_class": "TrOCRProcessor"}))
    encoder = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        image_size=32, patch_size=16, initializer_range=1.0)
    decoder = TrOCRConfig(vocab_size=vocab, d_model=32, decoder_layers=1, decoder_attention_heads=2,
                          decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                          eos_token_id=2, decoder_start_token_id=2, tie_word_embeddings=False, init_std=1.0)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 2, 1, 2
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config).eval()
    with torch.no_grad():
        norm = model.decoder.model.decoder.layers[-1].final_layer_norm
        norm.weight[0], norm.bias[0] = 0.0, 1.0
        rows = model.decoder.output_projection.weight
        rows[[0, 1, 2]] = 0.0
        rows[[0, 1, 2], 0] = -100.0
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ocr(trocr_dir):
    return rewards.load("ocr", path=str(trocr_dir), local_files_only=True, max_new_tokens=4)


def test_tiny_trocr_scores_a_batch_as_transformers_reads_it(ocr, trocr_dir):
    """Tensor preprocessing == the checkpoint's image processor; the text read == transformers' greedy
    ``generate`` + ``batch_decode``; each score == the rule on that text and the prompt's quoted text."""
    from transformers import TrOCRProcessor, VisionEncoderDecoderModel

    torch.manual_seed(1)
    media = torch.rand(3, 3, 48, 40)
    prompts = ['a sign that says "hello"', 'a shop front reading "open 24 hours"', "a mug"]
    metadata = [{}, {}, {"ocr_text": "coffee"}]
    processor = TrOCRProcessor.from_pretrained(trocr_dir, local_files_only=True)
    model = VisionEncoderDecoderModel.from_pretrained(trocr_dir, local_files_only=True).eval()
    pixels = processor.image_processor(list(media), do_rescale=False, return_tensors="pt").pixel_values
    assert pixels.shape == (3, 3, 32, 32)
    torch.testing.assert_close(ocr.pixel_values(media), pixels, atol=1e-5, rtol=0)
    tokens = model.generate(pixel_values=pixels, do_sample=False, num_beams=1, max_new_tokens=4)
    read = processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    assert ocr.recognise(media) == read and all(read) and len(set(read)) == 3
    expected = [ocr_reward(text, target) for text, target in zip(read, ["hello", "open 24 hours", "coffee"])]
    scores = ocr.score(media, prompts, metadata)
    assert scores.dtype == torch.float32 and scores.tolist() == pytest.approx(expected)
    assert ocr.input_spec.size == (32, 32) and not ocr.differentiable


def test_stubbed_recogniser_gives_exact_rewards(ocr, monkeypatch):
    """With the text read fixed, the scores are the hand-computed ones, batch chunking included."""
    texts = iter(["helo", "xxhelloxx", "", "Open24 HOURS", "opn 24 hours", "anything"])
    monkeypatch.setattr(ocr, "recognise", lambda media: [next(texts) for _ in range(len(media))])
    monkeypatch.setattr(ocr, "batch_size", 4)
    monkeypatch.setattr(ocr, "missing", "zero")
    prompts = ['"hello"'] * 3 + ['a sign "open 24 hours"'] * 2 + ["no target here"]
    scores = ocr.score(torch.rand(6, 3, 32, 32), prompts)
    assert scores.tolist() == pytest.approx([0.8, 1.0, 0.0, 1.0, 1 - 1 / 11, 0.0])


def test_a_sample_without_target_text_is_one_line(ocr, monkeypatch):
    monkeypatch.setattr(ocr, "batch_size", 2)
    prompts = ['"a"', '"b"', '"c"', "a sign with no quotes"]
    with pytest.raises(RewardError) as err:
        ocr.score(torch.rand(4, 3, 32, 32), prompts)
    assert str(err.value).startswith("reward ocr: sample 3 has no target text") and "missing=zero" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(RewardError, match="missing must be 'error' or 'zero'"):
        rewards.load("ocr", path="/nonexistent", missing="skip")


def test_a_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(RewardError) as err:
        rewards.load("ocr", path=str(tmp_path / "nowhere"), local_files_only=True)
    assert str(err.value).startswith(f"reward ocr: cannot load {tmp_path / 'nowhere'}") and "\n" not in str(err.value)
