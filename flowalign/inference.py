"""Sampling with a Generator: ODE (Euler) sampling with classifier-free guidance, seeded and batched."""
from __future__ import annotations

import torch

from samplers import euler_ode

from .generators.base import Generator


@torch.no_grad()
def generate(generator: Generator, prompts: list[str] | str, *, steps: int | None = None,
             guidance: float | None = None, seed: int = 0, negative_prompt: str = "",
             batch_size: int = 250) -> torch.Tensor:
    """Decoded media for ``prompts`` (one sample each). Sample i's noise depends only on ``seed`` and i,
    so the same seed gives the same media whatever the batch size."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    steps = steps or generator.default_steps
    guidance = generator.default_guidance if guidance is None else guidance
    noise = generator.initial_noise(len(prompts), torch.Generator().manual_seed(seed))
    sigmas = generator.sigmas(steps)
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        cond = generator.encode(batch, negative_prompt if guidance != 1.0 else None)
        x = euler_ode(lambda x, s: generator.velocity(x, s, cond, guidance), noise[start:start + len(batch)], sigmas)
        out.append(generator.decode(x))
    return torch.cat(out)


def save_grid(media: torch.Tensor, path, nrow: int = 10, min_size: int = 64) -> None:
    """Save images ``[B,3,H,W]`` in [0,1] as one PNG grid (small images upscaled, nearest, for viewing)."""
    import torch.nn.functional as F
    from torchvision.utils import save_image

    if media.shape[-1] < min_size:
        media = F.interpolate(media, scale_factor=min_size // media.shape[-1], mode="nearest")
    save_image(media, path, nrow=nrow, padding=2, pad_value=0.3)
