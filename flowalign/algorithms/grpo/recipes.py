"""Flow-GRPO, DanceGRPO and MixGRPO as recipes of the shared parts: which steps are SDE, which are trained, which
noise, how advantages are normalised. Defaults from the papers live in ``configs/``; this file only maps
a config onto the parts (grpo_family.md §1, §2)."""
from __future__ import annotations

import torch

from ...config import GRPOConfig
from ...samplers.kernels import NoiseSchedule, cps, dance, ddim, flow_grpo
from ...samplers.rollout import Node
from ...samplers.structures import branches, independent, linear_depth_noise, singular, tree
from ...samplers.windows import WindowSchedule


def noise_schedule(cfg: GRPOConfig) -> NoiseSchedule:
    """``flow_grpo(a)`` (g = a·sqrt(σ/(1-σ))), ``dance(η)`` (g = η), ``cps(a)`` or ``ddim(η)`` (DDPO's
    DDIM-η for ε/v-prediction models such as SD 1.5 / SDXL, in flow coordinates)."""
    if cfg.noise == "cps":
        return cps(cfg.noise_level, cfg.cps_logp)
    return {"flow_grpo": flow_grpo, "dance": dance, "ddim": ddim}[cfg.noise](cfg.noise_level)


def sde_and_train_steps(cfg: GRPOConfig, iteration: int) -> tuple[list[int], list[int], float | None]:
    """The SDE steps, the trainable steps, and DanceGRPO's per-sample fraction (None: train them all).

    - Flow-GRPO: all steps SDE; trains steps ``0 .. int(T·timestep_fraction) - 1`` in order;
    - Flow-GRPO-Fast (``window_size > 0``): SDE only in a random window below ``window_high``; trains it;
    - DanceGRPO: all steps SDE; the last is never trained; a random ``timestep_fraction`` of the rest per sample;
    - MixGRPO: SDE only in a sliding window (``window_kind``, default progressive: ``window_size`` 4 steps,
      moving by ``window_stride`` every ``window_dwell`` iterations below ``steps - 2``); trains it.
    """
    T = cfg.steps
    if cfg.algorithm == "mix_grpo" or cfg.window_size:
        steps = sde_window(cfg).steps(iteration, T)
        return steps, steps, None
    if cfg.algorithm == "dance_grpo" or cfg.random_timesteps:
        return list(range(T)), list(range(T - 1)), cfg.timestep_fraction
    return list(range(T)), list(range(max(1, int(T * cfg.timestep_fraction)))), None


def sde_window(cfg: GRPOConfig) -> WindowSchedule:
    """MixGRPO's sliding window, or Flow-GRPO-Fast's random window drawn below ``window_high``."""
    if cfg.algorithm == "mix_grpo":
        return WindowSchedule(cfg.window_kind, size=cfg.window_size or 4, dwell=cfg.window_dwell,
                              stride=cfg.window_stride, roll_back=cfg.window_roll_back,
                              max_steps=cfg.window_max_steps or cfg.steps - 2, seed=cfg.seed)
    return WindowSchedule("random", size=cfg.window_size, high=cfg.window_high or cfg.steps // 2, seed=cfg.seed)


def rollout_plan(cfg: GRPOConfig, sigmas: torch.Tensor, iteration: int,
                 select: list[int]) -> tuple[list[Node], torch.Tensor]:
    """This process's share (``select``: trajectory indices) of the iteration's independent trajectories."""
    sde, train, fraction = sde_and_train_steps(cfg, iteration)
    return independent(sigmas, cfg.prompts_per_iteration, cfg.group_size, sde_steps=sde, train_steps=train,
                       train_fraction=fraction, share_prefix=cfg.share_noise,
                       seed=cfg.seed * 7919 + iteration, select=select)


def flash_split(cfg: GRPOConfig, sigmas: torch.Tensor, iteration: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MixGRPO-Flash (grpo_family.md §3): the grid up to the end of the SDE window, and the tail the
    trajectories are finished on by DPM-Solver++: ``max(int((T-1-last)·flash_fraction), 1)`` steps re-spaced
    over the rest of the model's own grid (None when the window reaches the end)."""
    T = len(sigmas) - 1
    last = max(sde_and_train_steps(cfg, iteration)[0])
    if last + 1 >= T:
        return sigmas, None
    n = max(int((T - 1 - last) * cfg.flash_fraction), 1)
    position = torch.linspace(last + 1, T, n + 1, device=sigmas.device)
    low = position.floor().long().clamp(max=T - 1)
    tail = torch.lerp(sigmas[low], sigmas[low + 1], position - low)
    return sigmas[:last + 2], tail


#: Variants whose rollouts share a trunk per prompt (one root per prompt, groups inside the plan).
STRUCTURED = ("tempflow_grpo", "g2rpo", "tree_grpo")


def structured_plan(cfg: GRPOConfig, sigmas: torch.Tensor, iteration: int) -> tuple[list[Node], torch.Tensor]:
    """TempFlow-GRPO, G²RPO and Dynamic-TreeRPO plans over all of the iteration's prompts (grpo_family.md §4-§6).

    - TempFlow-GRPO: an ODE trunk; ``group_size`` SDE branches at each of ``branch_steps`` (default all but the
      last), each finished by ODE; a group per (prompt, step);
    - G²RPO: one SDE step at each of ``sde_steps`` (default the first half), ``group_size`` branches each
      finished at every stride; a group per (prompt, step, stride);
    - Dynamic-TreeRPO: binary splits at the first ``tree_depth`` steps of a sliding SDE window (MixGRPO's
      schedule), ODE outside, noise rising with depth (``depth_noise_beta``, paper-approximate).
    """
    T, P = cfg.steps, cfg.prompts_per_iteration
    if cfg.algorithm == "tempflow_grpo":
        return branches(sigmas, P, cfg.branch_steps or list(range(T - 1)), num_branches=cfg.group_size)
    if cfg.algorithm == "g2rpo":
        return singular(sigmas, P, cfg.sde_steps or list(range(T // 2)), group_size=cfg.group_size,
                        strides=tuple(cfg.strides))
    window = WindowSchedule(cfg.window_kind, size=max(cfg.window_size, cfg.tree_depth), dwell=cfg.window_dwell,
                            stride=cfg.window_stride, roll_back=cfg.window_roll_back,
                            max_steps=cfg.window_max_steps or T - 1, seed=cfg.seed).steps(iteration, T)
    return tree(sigmas, P, window[:cfg.tree_depth], branching=2, sde_steps=window,
                depth_noise=linear_depth_noise(cfg.depth_noise_beta))
