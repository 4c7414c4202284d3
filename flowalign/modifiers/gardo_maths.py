"""GARDO's computations apart from the modifier (``gardo.py``): the rank uncertainty and its gate, the risk
compensator, the reference's reset test and the diversity-aware advantages with their features."""
from __future__ import annotations

from typing import Callable, Literal

import torch


class RiskCompensator:
    """κ, the gated share: ×(1+step) when the mean non-negative uncertainty exceeds every one of the last
    ``window``, ×(1-step) when it is below every one, kept in [gate_min, gate_max]."""

    def __init__(self, options):
        self.options, self.fraction, self.history = options, options.gate_fraction, []

    def update(self, value: float) -> float:
        o = self.options
        if self.history and value > max(self.history):
            self.fraction *= 1 + o.gate_step
        elif self.history and value < min(self.history):
            self.fraction *= 1 - o.gate_step
        self.fraction = min(max(self.fraction, o.gate_min), o.gate_max)
        self.history = [*self.history, value][-o.gate_window:]
        return self.fraction


def descending_ranks(scores: torch.Tensor) -> torch.Tensor:
    """1 for the highest score, n for the lowest (ties: the earlier sample first)."""
    order = torch.argsort(scores, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(scores) + 1, device=scores.device)
    return ranks.float()


def uncertainty(main: torch.Tensor, auxiliaries: torch.Tensor,
                sign: Literal["proxy_ahead", "auxiliaries_ahead"] = "proxy_ahead") -> torch.Tensor:
    """``mean_k rank(aux_k) - rank(main)`` over the batch (``proxy_ahead``) or its negation; a sample with a NaN
    (skipped) reward gets -inf (never gated)."""
    valid = torch.isfinite(main) & torch.isfinite(auxiliaries).all(dim=0)
    u = torch.full_like(main, float("-inf"))
    if bool(valid.any()):
        aux = torch.stack([descending_ranks(a[valid]) for a in auxiliaries]).mean(dim=0)
        ahead = aux - descending_ranks(main[valid])
        u[valid] = ahead if sign == "proxy_ahead" else -ahead
    return u


def gate(u: torch.Tensor, fraction: float) -> torch.Tensor:
    """The samples above the ``100(1 - fraction)`` percentile (linear interpolation) of the non-negative ``u``."""
    nonneg = u[u >= 0]
    if not nonneg.numel():
        return torch.zeros_like(u, dtype=torch.bool)
    return u > torch.quantile(nonneg.float(), 1.0 - fraction)


def pixel_features(media: torch.Tensor) -> torch.Tensor:
    """Each sample's pixels, centred and L2-normalised ([B, D]); the default features (``features: pixels``)."""
    flat = media.detach().float().flatten(1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def encoder_features(embed: Callable[[torch.Tensor], torch.Tensor], media: torch.Tensor,
                     chunk: int = 16) -> torch.Tensor:
    """An image encoder's embeddings of each sample ``[B, D]``, ``chunk`` images at a time, L2-normalised as the
    anchor normalises DINOv3's; non-finite values count 0 (the anchor's ``nan_to_num``)."""
    if not len(media):  # a process without samples: an empty [0, D] (encoders may not take an empty batch)
        return embed(media.new_zeros(1, *media.shape[1:]).float()).float()[:0]
    parts = [embed(media[i:i + chunk].detach().float()).float() for i in range(0, len(media), chunk)]
    flat = torch.nan_to_num(torch.cat(parts), nan=0.0, posinf=0.0, neginf=0.0)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


def diversity_advantages(rewards: torch.Tensor, groups: torch.Tensor, features: torch.Tensor,
                         valid: torch.Tensor) -> torch.Tensor:
    """``(R_i - mean_group R)·m_i``; ``m_i = d_i / mean_group d`` where ``R_i >= mean``, else 1; ``d_i`` the
    cosine distance to the nearest other valid sample of the group. Invalid samples get 0."""
    adv = torch.zeros_like(rewards)
    for g in torch.unique(groups[valid]):
        members = (valid & (groups == g)).nonzero().squeeze(1)
        centred = rewards[members] - rewards[members].mean()
        if len(members) < 2:
            adv[members] = centred
            continue
        f = features[members]
        distance = 1 - (f @ f.T).clamp(-1, 1)
        distance.fill_diagonal_(float("inf"))
        nearest = distance.min(dim=1).values
        multiplier = torch.where(centred >= 0, nearest / nearest.mean().clamp_min(1e-12), torch.ones_like(nearest))
        adv[members] = centred * multiplier
    return adv


class ResetTest:
    """Whether the reference is due for a reset: the KL the gated transitions paid since the last test.

    ``iteration``: the mean KL over the gated transitions (every process's) exceeded ``threshold``.
    ``optimizer_step`` (the anchor's): after some optimizer step, the mean over its micro-batches of their gated
    KL (a micro-batch's mean over its gated transitions, 0 when it has none), averaged over the processes,
    exceeded it."""

    def __init__(self, mode: Literal["iteration", "optimizer_step"], threshold: float,
                 device: torch.device | str = "cpu"):
        self.mode, self.threshold = mode, threshold
        self.kl_sum = torch.zeros((), device=device)  # over the gated transitions since the last test
        self.kl_count = torch.zeros((), device=device)
        self.open_sum = torch.zeros((), device=device)  # the open optimizer step: its micro-batches' gated KLs
        self.open_batches = torch.zeros((), device=device)
        self.step_means: list[torch.Tensor] = []  # the closed steps' means since the last test

    def add(self, kl: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """One micro-batch's per-transition KL and gate (0/1); returns its gated KL."""
        gated = (kl.detach() * gate).sum()
        self.kl_sum += gated
        self.kl_count += gate.sum()
        batch_kl = gated / gate.sum().clamp_min(1.0)
        self.open_sum += batch_kl
        self.open_batches += 1
        return batch_kl

    def end_step(self) -> None:
        """An optimizer step closed the micro-batches added since the last one."""
        self.step_means.append(self.open_sum / self.open_batches.clamp_min(1.0))
        self.open_sum.zero_(), self.open_batches.zero_()

    def crossed(self, reduce: Callable[[torch.Tensor, str], torch.Tensor]) -> bool:
        """The test; ``reduce(tensor, "sum" | "mean")`` combines the processes' values (every process calls it)."""
        if self.mode == "iteration":
            sums = reduce(torch.stack([self.kl_sum, self.kl_count]), "sum")
            return bool(sums[1] > 0) and float(sums[0] / sums[1]) > self.threshold
        if not self.step_means:  # no optimizer step (the same on every process)
            return False
        return bool((reduce(torch.stack(self.step_means), "mean") > self.threshold).any())

    def clear(self) -> None:
        self.kl_sum.zero_(), self.kl_count.zero_(), self.open_sum.zero_(), self.open_batches.zero_()
        self.step_means = []

    def state(self) -> dict[str, list[float]]:
        return {"kl": [float(self.kl_sum), float(self.kl_count)], "step_kl": [float(m) for m in self.step_means]}

    def load(self, values: dict) -> None:
        self.kl_sum.fill_(values["kl"][0]), self.kl_count.fill_(values["kl"][1])
        self.step_means = [torch.tensor(m, device=self.kl_sum.device) for m in values.get("step_kl", [])]
