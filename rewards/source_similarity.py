"""How much an edit keeps of its source image: the CLIP image-image cosine (the editing benchmarks' CLIP-I) between
each sample and its source ``metadata[i]["image"]``, for editing runs to weigh against the instruction's reward."""
from __future__ import annotations

import torch
from PIL import Image

from .clip_score import OpenCLIPScore
from .errors import RewardError


class SourceSimilarity(OpenCLIPScore):
    """CLIP-I: ``weight · cos(CLIP(sample), CLIP(source))`` with an open_clip model (differentiable in the sample);
    each source image is read and embedded once."""

    name = "edit/clip-i"

    def __init__(self, model: str = "ViT-L-14", pretrained: str | None = "openai", weight: float = 100.0,
                 clamp: bool = True):
        super().__init__(model, pretrained, weight, clamp)
        self._sources: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def source_embedding(self, path: str, device: torch.device) -> torch.Tensor:
        if path not in self._sources:
            try:
                with Image.open(path) as image:
                    pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
                    pixels = pixels.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255
            except OSError as err:
                raise RewardError(f"reward {self.name}: source image '{path}' cannot be read "
                                  f"({type(err).__name__})") from None
            self._sources[path] = self.embed_images(pixels[None].to(device))[0]
        return self._sources[path].to(device)

    def _score(self, media, prompts, metadata):
        missing = next((i for i, meta in enumerate(metadata) if not meta.get("image")), None)
        if missing is not None:
            raise RewardError(f"reward {self.name}: sample {missing} ({prompts[missing][:60]!r}) has no source image "
                              "(metadata \"image\": a .jsonl prompt file's image field)")
        sources = torch.stack([self.source_embedding(meta["image"], media.device) for meta in metadata])
        cos = (self.embed_images(media) * sources.to(media.dtype)).sum(-1)
        return self.weight * (cos.clamp_min(0) if self.clamp else cos)
