"""Prompt-embedding cache: each distinct prompt is encoded once, its conditioning rows kept (on the CPU by
default) and reused; a cache saved to safetensors lets a run skip (or free) the text encoders entirely.

Rows are cached per prompt and per negative prompt separately, because an adapter's unconditional branch
for "" is not always the encoded "" (SDXL's zeros, Stable Audio's zeroed text tokens).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..errors import FlowalignError
from .base import Conditioning, Generator

Key = tuple[str, str]  # ("positive" | "negative", text)
Rows = dict[str, torch.Tensor]  # one prompt's tensors, without the batch dimension

FORMAT = "flowalign.prompt_embeds.v1"


class PromptCache:
    """Conditioning rows by prompt; ``encode`` has the signature of ``Generator.encode`` and only encodes misses."""

    def __init__(self, rows: dict[Key, Rows] | None = None, store: torch.device | str = "cpu",
                 source: str | None = None):
        self.rows: dict[Key, Rows] = dict(rows or {})
        self.store = torch.device(store)
        self.source = source  # the file it was loaded from, for messages
        self.encoder: Callable[..., Conditioning] | None = None
        self.device: torch.device | None = None
        self.requests = self.misses = 0  # rows asked for; rows that had to be encoded

    def bind(self, gen: Generator) -> "PromptCache":
        """Route ``gen.encode`` through this cache (the generator's own encode fills the misses)."""
        self.encoder, self.device = gen.encode, gen.device
        gen.encode = self.encode
        gen.prompt_cache = self
        return self

    def encode(self, prompts: list[str], negative_prompt: str | list[str] | None = "") -> Conditioning:
        prompts = list(prompts)
        negatives = None if negative_prompt is None else (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt))
        self._fill([p for p in prompts if ("positive", p) not in self.rows], negative=False)
        if negatives is not None:
            self._fill([n for n in negatives if ("negative", n) not in self.rows], negative=True)
        self.requests += len(prompts) + len(negatives or [])
        positive = self._stack([self.rows["positive", p] for p in prompts])
        negative = None if negatives is None else self._stack([self.rows["negative", n] for n in negatives])
        return Conditioning(prompts, positive, negative)

    def _fill(self, missing: list[str], negative: bool) -> None:
        """Encode the distinct missing texts in one batch and keep their rows."""
        missing = list(dict.fromkeys(missing))
        if not missing:
            return
        if self.encoder is None:
            where = f" '{self.source}'" if self.source else ""
            raise FlowalignError(f"prompt {missing[0]!r} is not in the prompt-embedding cache{where} and the text "
                                 "encoders are not loaded (precompute it: flowalign embed-prompts)")
        self.misses += len(missing)
        cond = self.encoder(missing, negative_prompt=missing) if negative else self.encoder(missing, None)
        branch = cond.negative if negative else cond.positive
        for i, text in enumerate(missing):
            self.rows["negative" if negative else "positive", text] = {
                name: t[i].detach().to(self.store, copy=True) for name, t in branch.items()}

    def _stack(self, rows: list[Rows]) -> dict[str, torch.Tensor]:
        device = self.device or self.store
        return {name: torch.stack([r[name] for r in rows]).to(device, non_blocking=True) for name in rows[0]}

    def save(self, path: str | Path) -> Path:
        """Write every cached row to one safetensors file (atomically), the prompts in its metadata."""
        path = Path(path)
        keys = list(self.rows)
        tensors = {f"{i}.{name}": t.contiguous() for i, key in enumerate(keys) for name, t in self.rows[key].items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "keys": json.dumps(keys)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, store: torch.device | str = "cpu") -> "PromptCache":
        path = Path(path)
        if not path.is_file():
            raise FlowalignError(f"prompt embeddings '{path}': file not found (write one with flowalign embed-prompts)")
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as err:  # safetensors raises its own error type for a damaged or foreign file
            raise FlowalignError(f"prompt embeddings '{path}': not a readable safetensors file "
                                 f"({type(err).__name__})") from None
        if meta.get("format") != FORMAT:
            raise FlowalignError(f"prompt embeddings '{path}': not a flowalign prompt-embedding file "
                                 f"(expected metadata format {FORMAT})")
        tensors = load_file(str(path), device=str(store))
        rows: dict[Key, Rows] = {}
        for i, (kind, text) in enumerate(json.loads(meta["keys"])):
            prefix = f"{i}."
            rows[kind, text] = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
        return cls(rows, store, source=str(path))
