"""Qwen-Image-Edit (image editing) behind the Generator interface, wrapping a diffusers ``QwenImageEditPipeline``.

Everything Qwen-Image does (qwen_image.py: the latent grid, timestep ``(σ·1000)/1000``, true CFG with the per-token
norm rescale, the shifted grid, decoding) plus a source image per prompt, which enters twice:

- text: the pipeline's edit template puts the source's vision tokens before the instruction, so the Qwen2.5-VL
  embedding depends on the image. ``encode`` therefore only tokenizes (``prompt_ids`` and its mask, zero-padded to
  ``max_sequence_length``: cacheable rows); ``with_sources`` runs the pipeline's ``encode_prompt`` on each
  instruction with its image, and on the negative prompt with the same image, as the pipeline does;
- latents: the source, VAE-encoded (the mode, then ``latents_mean`` / ``latents_std``), packed after the target's
  tokens (``img_shapes`` lists both); the velocity is the target tokens'.

Sizes: the pipeline resizes the source to ``calculate_dimensions(1024², aspect)`` (sides multiples of 32) for both
the VL encoder and the VAE. Here the VL input follows that rule with ``vision_area`` (default 1024²), per image;
the VAE input is resized to the output size (``height`` × ``width``), since a training batch needs one latent size
(the pipeline's own output size is that 1024² resize unless given). Without metadata (``flowalign generate`` with
plain prompts) there is no source: one line, as the pipeline requires an image.
"""
from __future__ import annotations

import math

import torch
from diffusers import QwenImageEditPipeline
from PIL import Image
from torch import nn

from ..errors import FlowalignError
from .base import Conditioning
from .qwen_image import QwenImageGenerator
from .sources import source_images

#: The pipeline's target area for the source image (``calculate_dimensions(1024 * 1024, ...)``).
PIPELINE_AREA = 1024 * 1024
#: Prompts encoded with their images per text-encoder pass (Qwen2.5-VL keeps every layer's hidden states).
ENCODE_CHUNK = 8


class QwenImageEditGenerator(QwenImageGenerator):
    """Qwen-Image-Edit: Qwen-Image's MMDiT conditioned on a source image's tokens and its VL-encoded instruction."""
    pipeline_class = QwenImageEditPipeline
    family = "Qwen-Image-Edit"
    lora_format = ("QwenImageEditPipeline", "transformer")

    def __init__(self, pipe: QwenImageEditPipeline, device: torch.device | str = "cpu", height: int | None = None,
                 width: int | None = None, max_sequence_length: int = 512, norm_rescale: bool = True,
                 vision_area: int = PIPELINE_AREA):
        super().__init__(pipe, device, height, width, max_sequence_length, norm_rescale)
        if isinstance(vision_area, bool) or not isinstance(vision_area, int) or vision_area < 32 * 32:
            raise FlowalignError(f"{self.family}: vision_area must be a pixel count of at least 1024 (32x32), "
                                 f"got {vision_area!r}")
        self.vision_area = vision_area

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompt: str | list[str] | None = "") -> Conditioning:
        """The instructions' (and negative prompts') token ids, zero-padded to ``max_sequence_length`` with their
        mask: the embedding needs the source image, so ``with_sources`` computes it."""
        prompts = list(prompts)
        negative = None
        if negative_prompt is not None:
            negative_prompt = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
            negative = self._tokenize(list(negative_prompt))
        return Conditioning(prompts, self._tokenize(prompts), negative)

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        rows = self.pipe.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids = torch.zeros(len(rows), self.max_sequence_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (text, row) in enumerate(zip(texts, rows)):
            if len(row) > self.max_sequence_length:
                raise FlowalignError(f"{self.family}: prompt {text[:60]!r} has {len(row)} tokens, more than "
                                     f"max_sequence_length ({self.max_sequence_length}; at most 1024)")
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row, dtype=torch.long), 1
        return {"prompt_ids": ids.to(self.device), "prompt_ids_mask": mask.to(self.device)}

    def _texts(self, branch: dict[str, torch.Tensor]) -> list[str]:
        """The texts back from their token ids (byte-level BPE: the same ids when tokenized again)."""
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(branch["prompt_ids"], branch["prompt_ids_mask"])]
        return self.pipe.tokenizer.batch_decode(rows, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @torch.no_grad()
    def with_sources(self, cond: Conditioning, metadata: list[dict] | None) -> Conditioning:
        """Each prompt (and its negative) encoded by Qwen2.5-VL with its source image, and the source's latents,
        in both branches; the branches' text is padded to one length (mask 0) so CFG batches them."""
        if metadata is None:
            raise FlowalignError(f"{self.family} edits a source image: give prompts with an \"image\" field "
                                 "(a .jsonl prompt file)")
        if self.pipe.text_encoder is None:
            raise FlowalignError(f"{self.family}: the text encoder encodes every prompt with its source image, so it "
                                 "cannot be dropped (train.text_encoders: device or offload)")
        images = source_images(cond.prompts, metadata, self.family)
        vision = [self.pipe.image_processor.resize(image, *self.vision_size(image)) for image in images]
        latents = {"source_latents": self._source_latents(images)}
        positive = self._encode_with_images(cond.prompts, vision)
        if cond.negative is None:
            return Conditioning(cond.prompts, {**positive, **latents}, None, dict(cond.extras))
        negative = self._encode_with_images(self._texts(cond.negative), vision)
        length = max(positive["prompt_embeds"].shape[1], negative["prompt_embeds"].shape[1])
        positive, negative = pad_text(positive, length), pad_text(negative, length)
        return Conditioning(cond.prompts, {**positive, **latents}, {**negative, **latents}, dict(cond.extras))

    def vision_size(self, image: Image.Image) -> tuple[int, int]:
        """(height, width) of the VL encoder's input: the pipeline's ``calculate_dimensions`` at ``vision_area``
        (the image's aspect ratio, sides rounded to multiples of 32; here at least 32)."""
        ratio = image.width / image.height
        width = math.sqrt(self.vision_area * ratio)
        return max(32, round(width / ratio / 32) * 32), max(32, round(width / 32) * 32)

    def _encode_with_images(self, texts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """The pipeline's ``encode_prompt`` with images, ``ENCODE_CHUNK`` prompts at a time, padded to one length."""
        parts = []
        for start in range(0, len(texts), ENCODE_CHUNK):
            embeds, mask = self.pipe.encode_prompt(texts[start:start + ENCODE_CHUNK],
                                                   image=images[start:start + ENCODE_CHUNK], device=self.device)
            if mask is None:  # encode_prompt drops an all-ones mask
                mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            parts.append({"prompt_embeds": embeds, "prompt_embeds_mask": mask})
        length = max(part["prompt_embeds"].shape[1] for part in parts)
        padded = [pad_text(part, length) for part in parts]
        return {key: torch.cat([part[key] for part in padded]) for key in padded[0]}

    def _source_latents(self, images: list[Image.Image]) -> torch.Tensor:
        """The sources at the output size through the VAE (the pipeline's ``_encode_vae_image``): ``[B, C, h, w]``."""
        latents = []
        for start in range(0, len(images), ENCODE_CHUNK):
            pixels = self.pipe.image_processor.preprocess(images[start:start + ENCODE_CHUNK], self.height, self.width)
            pixels = pixels.unsqueeze(2).to(self.device, self.pipe.vae.dtype)
            latents.append(self.pipe._encode_vae_image(pixels, generator=None)[:, :, 0])
        return torch.cat(latents)

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """The target's tokens then the source's (``img_shapes`` lists both), the VL-encoded text; the velocity of
        the target's tokens on the latent grid."""
        if "source_latents" not in embeds:
            raise FlowalignError(f"{self.family}: no source image in the conditioning (pass encode's output through "
                                 "with_sources with each prompt's metadata)")
        pipe, dtype = self.pipe, self.pipe.transformer.dtype
        b, c, h, w = x.shape
        source = embeds["source_latents"].to(dtype)
        source_h, source_w = source.shape[-2:]
        tokens = torch.cat([pipe._pack_latents(x.to(dtype), b, c, h, w),
                            pipe._pack_latents(source, b, c, source_h, source_w)], dim=1)
        img_shapes = [[(1, h // 2, w // 2), (1, source_h // 2, source_w // 2)]] * b
        out = self._transformer_pass(tokens, img_shapes, sigma, embeds)[:, :(h // 2) * (w // 2)]
        scale = pipe.vae_scale_factor
        return pipe._unpack_latents(out, h * scale, w * scale, scale)[:, :, 0].float()


def pad_text(branch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """``prompt_embeds`` and its mask zero-padded (mask 0) to ``length`` tokens."""
    pad = length - branch["prompt_embeds"].shape[1]
    return {"prompt_embeds": nn.functional.pad(branch["prompt_embeds"], (0, 0, 0, pad)),
            "prompt_embeds_mask": nn.functional.pad(branch["prompt_embeds_mask"], (0, pad))}
