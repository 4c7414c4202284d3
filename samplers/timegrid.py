"""Time grids: the σ values a sampling run visits, from ~1 down to 0 (``num_steps + 1`` values).

``from_scheduler_config`` gives exactly the sigmas a diffusers pipeline uses (SD3's static shift, FLUX's
dynamic shift from the image sequence length); ``shifted_linspace`` is the FastVideo grid of DanceGRPO,
MixGRPO, Pref-GRPO and BranchGRPO.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch


def dynamic_shift_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's ``mu``: linear in the number of image tokens (diffusers' ``calculate_shift``)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def from_scheduler_config(config: dict, num_steps: int, image_seq_len: int | None = None,
                          base: Literal["scheduler", "flux"] = "scheduler") -> torch.Tensor:
    """The sigmas of a ``FlowMatchEulerDiscreteScheduler`` config after ``set_timesteps(num_steps)``.

    ``base="flux"``: the FLUX pipelines pass ``sigmas = linspace(1, 1/N, N)`` to the scheduler (then shift
    them); SD3 and the others use the scheduler's own spacing."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(config))
    base_sigmas = None
    if base == "flux" and not scheduler.config.get("use_flow_sigmas", False):
        base_sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    mu = None
    if scheduler.config.get("use_dynamic_shifting", False):
        if image_seq_len is None:
            raise ValueError("time grid: this scheduler uses dynamic shifting; give image_seq_len")
        c = scheduler.config
        mu = dynamic_shift_mu(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                              c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    if base_sigmas is not None:
        scheduler.set_timesteps(sigmas=base_sigmas, mu=mu)
    else:
        scheduler.set_timesteps(num_steps, mu=mu)
    return scheduler.sigmas.float()


def shifted_linspace(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """``σ = linspace(1, 0, T+1)``, then ``σ ← s·σ / (1 + (s-1)·σ)`` (s = 3 for FLUX, 5 for HunyuanVideo)."""
    sigma = torch.linspace(1, 0, num_steps + 1)
    return shift * sigma / (1 + (shift - 1) * sigma)
