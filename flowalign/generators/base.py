"""The Generator interface every model family implements (docs/generators.md).

Flow convention throughout: ``x_σ = (1-σ)·x0 + σ·ε`` and the velocity ``v ≈ ε - x0``, so one Euler
step is ``x_next = x + (σ_next - σ)·v``. Adapters of ε- or v-prediction models convert to this.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

Modality = Literal["image", "video", "audio", "audio_video"]


@dataclass
class Conditioning:
    """Encoded prompts: named tensors for the positive branch and, for CFG, the negative branch.

    Each adapter decides the names (``prompt_embeds``, ``pooled``, ...); every tensor is batch-first, so
    the generic helpers below (select, repeat, device moves) work for all families.
    """

    prompts: list[str]
    positive: dict[str, torch.Tensor]
    negative: dict[str, torch.Tensor] | None = None
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def _map(self, fn) -> dict[str, torch.Tensor] | None:
        return None if self.negative is None else {k: fn(v) for k, v in self.negative.items()}

    def select(self, index: torch.Tensor | list[int]) -> "Conditioning":
        """Rows ``index`` of the batch (e.g. one group of a GRPO batch)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        pick = lambda t: t[idx.to(t.device)]  # noqa: E731
        return Conditioning([self.prompts[i] for i in idx.tolist()],
                            {k: pick(v) for k, v in self.positive.items()}, self._map(pick), dict(self.extras))

    def repeat_interleave(self, k: int) -> "Conditioning":
        """Each prompt k times in a row: the layout of a GRPO group."""
        rep = lambda t: t.repeat_interleave(k, dim=0)  # noqa: E731
        return Conditioning([p for p in self.prompts for _ in range(k)],
                            {n: rep(v) for n, v in self.positive.items()}, self._map(rep), dict(self.extras))

    def to(self, device: torch.device | str) -> "Conditioning":
        move = lambda t: t.to(device)  # noqa: E731
        return Conditioning(list(self.prompts), {k: move(v) for k, v in self.positive.items()},
                            self._map(move), dict(self.extras))


class Generator(ABC):
    """A text-conditioned flow generator behind one interface, whatever the model family."""

    modality: Modality = "image"
    #: Defaults used by ``generate`` when the caller gives none.
    default_steps: int = 28
    default_guidance: float = 4.5

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latent (without batch), e.g. ``(C, H, W)``."""

    @abstractmethod
    def encode(self, prompts: list[str], negative_prompt: str | list[str] | None = "") -> Conditioning:
        """Encode prompts; ``negative_prompt=None`` skips the unconditional branch (no CFG)."""

    def with_sources(self, cond: Conditioning, metadata: list[dict] | None) -> Conditioning:
        """Add what each prompt's metadata conditions on beside its text (an editing model encodes the source image
        ``metadata[i]["image"]`` here, batch-first in both branches); text-only models return ``cond`` as it is."""
        return cond

    @abstractmethod
    def predict(self, x: torch.Tensor, sigma: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """One model pass on a batch: the flow velocity for latents ``x`` at noise levels ``sigma`` ([B])."""

    @abstractmethod
    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The noise levels of a ``num_steps`` sampling run, from ~1 down to 0 (``num_steps + 1`` values)."""

    @abstractmethod
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents to media: image ``[B,3,H,W]`` in [0,1], video ``[B,F,3,H,W]`` in [0,1],
        audio ``[B,C,L]`` in [-1,1]; ``audio_video``: an ``AudioVideo`` holding a clip and its audio."""

    @property
    @abstractmethod
    def trainable_module(self) -> nn.Module:
        """The module fine-tuning changes (the transformer / UNet)."""

    #: Module names LoRA adapts (peft ``target_modules``).
    lora_target_modules: list[str] = []
    #: How a trained LoRA is saved so diffusers loads it: (pipeline class whose ``save_lora_weights`` writes
    #: it, the component it belongs to: ``transformer`` or ``unet``).
    lora_format: tuple[str, str] = ("StableDiffusion3Pipeline", "transformer")
    #: Set by a trainer to the accelerate-prepared (DDP / FSDP) wrapper of ``trainable_module``, so the
    #: model passes go through it (gradient sync); None: call the module itself.
    wrapped_module: nn.Module | None = None

    @property
    def forward_module(self) -> nn.Module:
        return self.wrapped_module if self.wrapped_module is not None else self.trainable_module

    def initial_noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal latents, drawn on the CPU from ``generator`` so a seed gives the same noise on any device."""
        noise = torch.randn((n, *self.latent_shape), generator=generator, dtype=torch.float32)
        return noise.to(self.device)

    def initial_state(self, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """The sampling state at the first noise level ``sigma`` (``sigmas(n)[0]``) for ``initial_noise``:
        the noise itself for flow models; ε/v-prediction adapters rescale it to flow coordinates."""
        return noise

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning,
                 guidance: float = 1.0) -> torch.Tensor:
        """The (guided) velocity at ``x``: CFG's two branches are batched into one model pass."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if guidance == 1.0 or cond.negative is None:
            return self.predict(x, sigma, cond.positive)
        both = {k: torch.cat([cond.negative[k], cond.positive[k]]) for k in cond.positive}
        v_uncond, v_cond = self.predict(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        return v_uncond + guidance * (v_cond - v_uncond)
