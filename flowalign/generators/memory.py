"""Where the frozen text encoders live: on the device, offloaded to the CPU between uses, or dropped.

T5-XXL (FLUX, SD3.5) and UMT5 (Wan) are larger than the LoRA-trained model's activations; a run that
encodes a handful of prompts per iteration need not keep them on the accelerator. ``offload`` uses
accelerate's ``cpu_offload_with_hook`` (moved to the device for a forward, back to the CPU after each
``encode``); ``drop`` frees them, so every prompt must come from a precomputed prompt-embedding file.
"""
from __future__ import annotations

import functools
from typing import Literal

from torch import nn

from ..errors import FlowalignError
from .base import Generator
from .prompt_cache import PromptCache

Placement = Literal["device", "offload", "drop"]


def _owner(gen: Generator):
    """The object holding the encoders: a diffusers pipeline for real models, the generator for toys."""
    return getattr(gen, "pipe", gen)


def text_encoders(gen: Generator) -> dict[str, nn.Module]:
    """The generator's frozen text encoders by attribute name (``text_encoder``, ``text_encoder_2``, ...)."""
    owner = _owner(gen)
    names = sorted(n for n in getattr(owner, "components", vars(owner)) if n.startswith("text_encoder"))
    return {n: getattr(owner, n) for n in names if isinstance(getattr(owner, n, None), nn.Module)}


def offload_text_encoders(gen: Generator) -> list:
    """Keep the text encoders on the CPU; each forward moves one to ``gen.device`` (offloading the previous
    one), and every ``encode`` and ``with_sources`` ends with all of them back on the CPU. Returns accelerate's
    hooks."""
    from accelerate import cpu_offload_with_hook

    hooks, previous = [], None
    for module in text_encoders(gen).values():
        _, previous = cpu_offload_with_hook(module, execution_device=gen.device, prev_module_hook=previous)
        hooks.append(previous)
    # encode and with_sources (an editing model's encoder sees the source image) each end with the encoders offloaded
    gen.encode = _then_offload(gen.encode, hooks)
    gen.with_sources = _then_offload(gen.with_sources, hooks)
    return hooks


def _then_offload(call, hooks: list):
    @functools.wraps(call)
    def call_then_offload(*args, **kwargs):
        try:
            return call(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.offload()

    return call_then_offload


def drop_text_encoders(gen: Generator) -> list[str]:
    """Free the text encoders (set to None); returns their names."""
    owner, names = _owner(gen), list(text_encoders(gen))
    for name in names:
        setattr(owner, name, None)
    return names


def place_text_encoders(gen: Generator, placement: Placement = "device", cache_prompts: bool = False,
                        prompt_embeds: str | None = None) -> PromptCache | None:
    """Apply a run's memory options: a prompt-embedding cache (filled from ``prompt_embeds`` if given, else on
    the fly) and the encoders' placement. Returns the cache, if any."""
    if placement not in ("device", "offload", "drop"):
        raise FlowalignError(f"train.text_encoders: expected device, offload or drop, got {placement!r}")
    if placement == "drop" and not prompt_embeds:
        raise FlowalignError("train.text_encoders=drop needs train.prompt_embeds (a file from flowalign "
                             "embed-prompts): nothing could encode a prompt otherwise")
    if placement == "offload":
        offload_text_encoders(gen)
    cache = None
    if prompt_embeds or cache_prompts:
        cache = PromptCache.load(prompt_embeds) if prompt_embeds else PromptCache()
        cache.bind(gen)
    if placement == "drop":
        drop_text_encoders(gen)
        cache.encoder = None  # a prompt missing from the file is an error, not a crash inside a pipeline
    return cache
