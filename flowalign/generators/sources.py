"""Source images of image-editing models: each prompt's ``metadata["image"]`` (a .jsonl prompt file's ``image``
field), opened as RGB, with one line naming the prompt when a row has none or the file is not an image."""
from __future__ import annotations

from PIL import Image, UnidentifiedImageError

from ..errors import FlowalignError


def source_images(prompts: list[str], metadata: list[dict], family: str) -> list[Image.Image]:
    """The RGB source image of every prompt, in order (each file opened once)."""
    if len(metadata) != len(prompts):
        raise FlowalignError(f"{family}: {len(prompts)} prompts but {len(metadata)} metadata rows")
    opened: dict[str, Image.Image] = {}
    for prompt, meta in zip(prompts, metadata):
        path = meta.get("image")
        if not path:
            raise FlowalignError(f"{family}: prompt {prompt[:60]!r} has no source image (an editing model needs "
                                 "an \"image\" field per line of a .jsonl prompt file)")
        if path not in opened:
            try:
                with Image.open(path) as image:
                    opened[path] = image.convert("RGB")
            except (OSError, UnidentifiedImageError) as err:
                raise FlowalignError(f"{family}: source image '{path}' cannot be read ({type(err).__name__})") from None
    return [opened[meta["image"]] for meta in metadata]
