"""Tiny real-architecture rewards for the reward benchmark: random tiny checkpoints saved in the real
formats (a transformers CLIP folder, an open_clip HPS ``{"state_dict": ...}`` file, the aesthetic MLP
``.pth``, ``ImageReward.pt`` with BLIP's names, a ClapModel folder), loaded back through ``rewards.load``.

``TINY`` maps a registry name to a builder ``folder -> Reward``; everything is built offline. A reward whose
module, class or test helper is not there (yet), or that fails to load, raises ``Unavailable``.
"""
from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from flowalign import rewards
from flowalign.rewards.base import Reward

TESTS = Path(__file__).resolve().parents[1] / "tests"
SIZE = 64  # the tiny vision towers' input size (patch 32: 2x2 patches)
TINY_ARCH = "tiny-clip-bench"  # the tiny open_clip architecture, registered on first use


class Unavailable(Exception):
    """A tiny reward that cannot be built here: its module, class or a helper is missing, or it fails to load."""


def load_tiny(name: str, **kwargs) -> Reward:
    """``rewards.load(name, **kwargs)`` offline, with a missing or failing plug-in turned into ``Unavailable``."""
    try:
        return rewards.load(name, **kwargs).eval()
    except (ImportError, AttributeError, rewards.RewardError) as err:
        raise Unavailable(f"{name}: {type(err).__name__}: {' '.join(str(err).split())[:200]}") from None


@contextmanager
def quiet():
    """No progress bars or warnings while tiny models are built and loaded (they are random on purpose)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        hf_logging.enable_progress_bar()


def _tests_on_path() -> None:
    """Make the tests' helper modules (``sd3_tiny``, the reward tests' builders) importable."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


def _seeded(make, seed: int = 0):
    torch.manual_seed(seed)
    return make().eval()


def aesthetic_mlp_state(in_features: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random LAION-aesthetic MLP (in-1024-128-64-16-1, Linear + Dropout, no activation) as stored in its .pth."""
    mlp = _seeded(lambda: nn.Sequential(nn.Linear(in_features, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                        nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                        nn.Linear(16, 1)), seed)
    return {f"layers.{k}": v for k, v in mlp.state_dict().items()}


def tiny_hf_clip(folder: Path) -> Path:
    """A random tiny transformers ``CLIPModel`` (width 32, 2 layers, patch 32 at 64 px) and the real CLIP BPE
    tokenizer, saved with ``save_pretrained`` (built once per folder)."""
    if (folder / "config.json").exists():
        return folder
    from transformers import CLIPConfig, CLIPModel

    _tests_on_path()
    from sd3_tiny import clip_tokenizer_offline

    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=SIZE,
                  patch_size=32)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    _seeded(lambda: CLIPModel(config)).save_pretrained(folder)
    clip_tokenizer_offline(folder.parent / f"{folder.name}_tokenizer").save_pretrained(folder)
    return folder


def tiny_open_clip(folder: Path) -> Path:
    """A random tiny open_clip CLIP (the ViT-H-14 structure at width 32, registered as ``TINY_ARCH``) saved as
    HPS does, ``{"state_dict": ...}``, in ``folder/HPS_v2_compressed.pt`` and ``HPS_v2.1_compressed.pt``."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TINY_ARCH}.json").write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}))
    open_clip.add_model_config(folder / f"{TINY_ARCH}.json")
    state = _seeded(lambda: open_clip.create_model(TINY_ARCH, pretrained=None)).state_dict()
    for file in ("HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt"):
        torch.save({"state_dict": state}, folder / file)
    return folder


def tiny_clap(folder: Path) -> Path:
    """A random tiny ``ClapModel`` whose audio branch runs (window 2, 8 mel bins, patch stride 2), its feature
    extractor (1 s at 48 kHz) and a byte-level RoBERTa tokenizer, saved with ``save_pretrained``."""
    from open_clip.tokenizer import bytes_to_unicode  # GPT-2's byte-level alphabet
    from transformers import (
        ClapAudioConfig,
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapProcessor,
        ClapTextConfig,
        RobertaTokenizer,
    )

    byte_chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *byte_chars, "<mask>"])}
    text = ClapTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=8, intermediate_size=37,
                          num_attention_heads=1, num_hidden_layers=1, vocab_size=len(vocab), projection_dim=16)
    audio = ClapAudioConfig(spec_size=8, window_size=2, patch_stride=[2, 2], num_mel_bins=8, intermediate_size=37,
                            depths=[1, 1], num_attention_heads=[1, 1], num_hidden_layers=1, hidden_size=192,
                            projection_dim=16)
    config = ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=16)
    _seeded(lambda: ClapModel(config)).save_pretrained(folder)
    ClapProcessor(feature_extractor=ClapFeatureExtractor(feature_size=8, hop_length=7900, max_length_s=1),
                  tokenizer=RobertaTokenizer(vocab=vocab, merges=[], model_max_length=77)).save_pretrained(folder)
    return folder


def tiny_imagereward(folder: Path) -> Path:
    """A random tiny ImageReward (BLIP ViT width 48, BERT width 32, MLP) saved as ``ImageReward.pt`` with BLIP's
    names, ``med_config.json`` and a BERT ``vocab.txt``; the BLIP renaming comes from the image-reward tests."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    _tests_on_path()
    try:
        from test_rewards_image import blip_vit_name
    except ImportError as err:
        raise Unavailable(f"imagereward: no tiny builder ({err})") from None
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "handwritten", "seven", "photo", "of", "cat"]
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer" / "vocab.txt").write_text("\n".join(words) + "\n")
    med = {"architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": 32, "intermediate_size": 37,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 2,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(words) + 2,
           "encoder_width": 48, "add_cross_attention": True}
    (folder / "med_config.json").write_text(json.dumps(med))
    vision = _seeded(lambda: BlipVisionModel(BlipVisionConfig(
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
        patch_size=32, layer_norm_eps=1e-6)))
    text = _seeded(lambda: BlipTextModel(BlipTextConfig(
        vocab_size=len(words) + 2, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, encoder_hidden_size=48, is_decoder=True, bos_token_id=None, sep_token_id=None),
        add_pooling_layer=False), seed=1)
    state = {f"blip.visual_encoder.{blip_vit_name(k)}": v for k, v in vision.state_dict().items()}
    state |= {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
    state |= {f"mlp.{k}": v for k, v in aesthetic_mlp_state(32, seed=2).items()}
    torch.save(state, folder / "ImageReward.pt")
    return folder


# ---- builders: folder -> Reward ----------------------------------------------------------------------------

def _clip(folder: Path) -> str:
    """The shared tiny transformers CLIP folder beside ``folder``."""
    return str(tiny_hf_clip(folder.parent / "_hf_clip"))


def _open_clip_encoder(folder: Path) -> Reward:
    """The tiny open_clip CLIP as a CLIPScore reward: the image encoder (``embed_images``) of the video
    and set rewards."""
    checkpoint = tiny_open_clip(folder.parent / "_open_clip") / "HPS_v2_compressed.pt"
    return load_tiny("clipscore", model=TINY_ARCH, pretrained=str(checkpoint))


def build_aesthetic(folder: Path) -> Reward:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(aesthetic_mlp_state(32), folder / "sac+logos+ava1-l14-linearMSE.pth")
    return load_tiny("aesthetic", path=str(folder), clip_path=_clip(folder), local_files_only=True)


def build_hps(name: str) -> Callable[[Path], Reward]:
    def build(folder: Path) -> Reward:
        return load_tiny(name, path=str(tiny_open_clip(folder)), model=TINY_ARCH, local_files_only=True)
    return build


def build_imagereward(folder: Path) -> Reward:
    path = tiny_imagereward(folder)
    return load_tiny("imagereward", path=str(path), tokenizer_path=str(path / "tokenizer"), vision_heads=2,
                     local_files_only=True)


def build_set_reward(name: str) -> Callable[[Path], Reward]:
    """fd against 16 random reference images, exemplar against two text exemplars, vendi as is."""
    extra = {"fd": lambda: {"reference": torch.rand(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))},
             "exemplar": lambda: {"exemplars": ["a handwritten seven", "a photo of a cat"]}}.get(name, dict)

    def build(folder: Path) -> Reward:
        return load_tiny(name, encoder=_open_clip_encoder(folder), **extra())
    return build


#: Registry name -> builder of its tiny reward (given a scratch folder of its own).
TINY: dict[str, Callable[[Path], Reward]] = {
    "clipscore-hf": lambda f: load_tiny("clipscore-hf", path=_clip(f), clamp=False, local_files_only=True),
    "pickscore": lambda f: load_tiny("pickscore", path=_clip(f), processor_path=_clip(f), local_files_only=True),
    "hpsv2": build_hps("hpsv2"),
    "hpsv2.1": build_hps("hpsv2.1"),
    "aesthetic": build_aesthetic,
    "imagereward": build_imagereward,
    "video/frames": lambda f: load_tiny("video/frames", image_reward=load_tiny(
        "clipscore-hf", path=_clip(f), clamp=False, local_files_only=True)),
    "video/temporal": lambda f: load_tiny("video/temporal", encoder=_open_clip_encoder(f)),
    "clap": lambda f: load_tiny("clap", path=str(tiny_clap(f)), local_files_only=True),
    "fd": build_set_reward("fd"),
    "vendi": build_set_reward("vendi"),
    "exemplar": build_set_reward("exemplar"),
}
