"""Flow-GRPO's OCR reward: ``1 - min(edit distance, len(target)) / len(target)`` between the text read from the image
and the prompt's quoted text (0 distance when the target occurs in what was read).

Flow-GRPO reads the text with PaddleOCR; here a transformers TrOCR (``VisionEncoderDecoderModel``: ViT encoder,
TrOCR decoder) reads it with greedy decoding, so no Paddle stack is needed. The preprocessing is the checkpoint's
image processor's (resize to its size, rescale, normalise) done on tensors.
"""
from __future__ import annotations

import re
from typing import Literal

import torch
import torch.nn.functional as F

from .base import InputSpec, Reward
from .errors import RewardError
from .loading import check_local, load_errors

#: The first "..." (or “...”) in a prompt holds the text the image should show.
QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')
#: Metadata keys that give the target text directly (checked in this order; they win over the prompt).
TARGET_KEYS = ("ocr_text", "text")
#: PIL resampling codes (the image processor's ``resample``) -> ``F.interpolate`` modes (no Lanczos in torch).
RESAMPLE_MODES = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic"}


def levenshtein(a: str, b: str) -> int:
    """Edit distance (one insertion, deletion or substitution of a character each); a two-row DP, no dependency."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def normalise(text: str) -> str:
    """Lower case, whitespace removed (Flow-GRPO removes spaces; tabs and newlines go too)."""
    return "".join(text.split()).lower()


def target_text(prompt: str, metadata: dict) -> str | None:
    """The text the image should show: ``metadata["ocr_text"]`` or ``["text"]``, else the prompt's first quoted
    text; None when there is none (or it is only whitespace)."""
    for key in TARGET_KEYS:
        if metadata.get(key) is not None:
            text = str(metadata[key])
            return text if normalise(text) else None
    match = QUOTED.search(prompt)
    if match is None:
        return None
    text = match.group(1) if match.group(1) is not None else match.group(2)
    return text if normalise(text) else None


def ocr_reward(recognised: str, target: str) -> float:
    """Flow-GRPO's rule on normalised strings: ``d = 0`` if the target occurs in the recognised text, else
    ``min(levenshtein, len(target))``; the reward is ``1 - d / len(target)``, in [0, 1]."""
    recognised, target = normalise(recognised), normalise(target)
    if not target:
        raise ValueError("the target text is empty")
    distance = 0 if target in recognised else min(levenshtein(recognised, target), len(target))
    return 1.0 - distance / len(target)


def image_settings(image_processor) -> dict:
    """Size, resampling, rescale factor and normalisation of a ViT-style image processor (any transformers)."""
    config = image_processor.to_dict()
    size = config.get("size") or {}
    size = (size, size) if isinstance(size, int) else (size.get("height") or size.get("shortest_edge"),
                                                      size.get("width") or size.get("shortest_edge"))
    if not all(size):
        raise ValueError(f"expected the image processor's size as height and width, got {config.get('size')}")
    normalize = config.get("do_normalize", True)
    return {"size": tuple(int(s) for s in size), "resize": config.get("do_resize", True),
            "mode": RESAMPLE_MODES.get(int(config.get("resample", 2)), "bilinear"),
            "scale": 255.0 * (config.get("rescale_factor", 1 / 255) if config.get("do_rescale", True) else 1.0),
            "mean": tuple(config.get("image_mean") or (0.0,) * 3) if normalize else (0.0,) * 3,
            "std": tuple(config.get("image_std") or (1.0,) * 3) if normalize else (1.0,) * 3}


class OCRReward(Reward):
    """Flow-GRPO's OCR reward: how closely the text a TrOCR reads matches the prompt's quoted text (1 = exact).

    ``path``: a TrOCR checkpoint (hub id or folder: model, image processor, tokenizer), default
    ``microsoft/trocr-base-printed``. ``missing``: a sample without target text is an error (``error``) or scores
    0 (``zero``). ``max_new_tokens``: the longest text read."""

    name = "ocr"
    batch_size = 16

    def __init__(self, path: str = "microsoft/trocr-base-printed", local_files_only: bool = False,
                 max_new_tokens: int = 32, missing: Literal["error", "zero"] = "error"):
        super().__init__()
        if missing not in ("error", "zero"):
            raise ValueError(f"ocr: missing must be 'error' or 'zero', got {missing!r}")
        from transformers import TrOCRProcessor, VisionEncoderDecoderModel

        with load_errors(self.name, path):
            check_local(path)
            self.model = VisionEncoderDecoderModel.from_pretrained(path, local_files_only=local_files_only,
                                                                   dtype=torch.float32)
            processor = TrOCRProcessor.from_pretrained(path, local_files_only=local_files_only)
            self.image = image_settings(processor.image_processor)
        self.model.eval().requires_grad_(False)
        self.tokenizer = processor.tokenizer
        self.max_new_tokens, self.missing = max_new_tokens, missing
        self.input_spec = InputSpec(range=(0.0, 1.0), layout="BCHW", size=self.image["size"])

    def pixel_values(self, media: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] -> the model's input, as its image processor makes it (on tensors)."""
        settings = self.image
        if settings["resize"] and tuple(media.shape[-2:]) != settings["size"]:
            smooth = settings["mode"] != "nearest"
            media = F.interpolate(media, size=settings["size"], mode=settings["mode"],
                                  align_corners=False if smooth else None, antialias=smooth)
        mean = torch.tensor(settings["mean"], device=media.device, dtype=media.dtype).view(1, -1, 1, 1)
        std = torch.tensor(settings["std"], device=media.device, dtype=media.dtype).view(1, -1, 1, 1)
        return (media * settings["scale"] - mean) / std

    @torch.no_grad()
    def recognise(self, media: torch.Tensor) -> list[str]:
        """The text read from each image (greedy decoding, special tokens dropped)."""
        tokens = self.model.generate(pixel_values=self.pixel_values(media), do_sample=False, num_beams=1,
                                     max_new_tokens=self.max_new_tokens)
        return self.tokenizer.batch_decode(tokens, skip_special_tokens=True)

    def targets(self, prompts: list[str], metadata: list[dict]) -> list[str | None]:
        """Each sample's target text; with ``missing="error"`` one line naming the first sample without one."""
        targets = [target_text(p, m) for p, m in zip(prompts, metadata)]
        if self.missing == "error" and None in targets:
            index = targets.index(None)
            raise RewardError(f"reward {self.name}: sample {index} has no target text (no quoted text in its prompt "
                              f"{prompts[index][:80]!r}, no metadata ocr_text or text); set missing=zero to score "
                              "such samples 0")
        return targets

    def score(self, media: torch.Tensor, prompts: list[str] | None = None,
              metadata: list[dict] | None = None) -> torch.Tensor:
        n = media.shape[0] if isinstance(media, torch.Tensor) else 0
        self.targets(list(prompts) if prompts is not None else [""] * n,
                     list(metadata) if metadata is not None else [{} for _ in range(n)])  # names the sample
        return super().score(media, prompts, metadata)

    def _score(self, media, prompts, metadata):
        targets = self.targets(prompts, metadata)
        read = self.recognise(media) if any(t is not None for t in targets) else [""] * len(targets)
        scores = [ocr_reward(text, target) if target is not None else 0.0 for text, target in zip(read, targets)]
        return torch.tensor(scores, device=media.device)
