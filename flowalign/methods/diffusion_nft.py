"""DiffusionNFT (arXiv 2509.16117): negative-aware fine-tuning on the forward process.

A lagged copy of the policy (the "old" policy) samples with any ODE solver, without CFG; each sample's group
z-score becomes an optimality ``r = clip(0.5 + clip(A, ±5)/10, 0, 1)``. At fresh noise levels of each clean
sample the policy's velocity ``v`` and the old one ``v_old`` form an implicit positive policy
``v⁺ = β·v + (1-β)·v_old`` and its mirror ``v⁻ = (1+β)·v_old - β·v``; the loss pulls ``v⁺`` toward the data in
proportion to ``r`` and ``v⁻`` in proportion to ``1 - r``:

    L = 5 · mean[(r·L⁺ + (1-r)·L⁻) / β] + kl_weight · mean (v - v_ref)²,   L± = mean (σ(v± - u))² / w±

with ``u = ε - x0`` and ``w± = max(mean |σ(v± - u)|, 1e-5)`` without gradient (the code's adaptive weighting).
After each iteration ``θ_old ← d·θ_old + (1-d)·θ``, ``d = min(old_decay_rate·(steps - old_decay_flat),
old_decay_max)`` (0 before ``old_decay_flat``). ``v_ref`` is the LoRA-off base.

Paper-approximate (the paper writes an r-weighted velocity loss; these are its code's choices): the adaptive
weighting (``adaptive_weight``), the factor 5 (= ``adv_clip``) over β, the decay schedule of the old policy.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from ..training.shadow import ShadowWeights, ramp_decay
from ..typed import bounded
from . import register_method
from .flow_matching import FlowMatchingMethod, FlowMatchingOptions, group_scores, require_lora_for, reward_group_scores


@dataclass
class DiffusionNFTOptions(FlowMatchingOptions):
    group_size: int = bounded(24, min=2, doc="ODE samples per prompt (one group)")
    fm_draws: int = bounded(9, min=1, doc="noise levels per sample: int(10 steps x 0.99) of the sampling grid")
    fm_sigma: Literal["uniform", "logit_normal", "grid"] = bounded("grid", doc="distinct levels of the sampling grid")
    solver: Literal["euler", "dpm_solver"] = bounded("dpm_solver", doc="DPM-Solver++ 2M (the code's dpm2)")
    beta: float = bounded(1.0, min=1e-6, doc="how far the implicit policies sit from the old one (OCR: 0.1)")
    kl_weight: float = bounded(1e-4, min=0.0, doc="weight of mean (v - v_ref)^2 to the LoRA-off base")
    adv_clip: float = bounded(5.0, min=1e-6, doc="advantages clipped to +-adv_clip before r = 0.5 + A/(2 adv_clip)")
    adv_mode: Literal["all", "positive_only", "negative_only", "one_only", "binary"] = bounded(
        "all", doc="advantages used as they are, only their positive or negative part, 1 where positive, or "
        "their sign")
    std: Literal["global", "group"] = bounded("global", doc="advantage std over the whole batch or per group")
    std_eps: float = bounded(1e-4, min=0.0, doc="added to the advantage std")
    adaptive_weight: bool = bounded(True, doc="divide each L+- by its own mean |x0 error| (paper-approximate)")
    old_decay_rate: float = bounded(0.001, min=0.0, doc="old policy decay d = min(rate*(steps - flat), max)")
    old_decay_max: float = bounded(0.5, min=0.0, max=1.0, doc="the decay's ceiling (0: the old policy is the "
                                   "policy after every iteration)")
    old_decay_flat: int = bounded(0, min=0, doc="optimizer steps with d = 0 before the ramp (OCR: 75)")


@register_method
class DiffusionNFT(FlowMatchingMethod):
    name = "diffusion_nft"
    title = "DiffusionNFT"
    paper = "arXiv 2509.16117"
    Options = DiffusionNFTOptions
    skips_failed_samples = True  # a skipped sample weighs 0 in the loss
    balances_rewards = True

    @classmethod
    def check(cls, options, train, modifiers) -> None:
        super().check(options, train, modifiers)
        require_lora_for(cls.name, options.kl_weight, train)

    def setup(self, trainer) -> None:
        self.old = ShadowWeights(trainer.params)  # the old policy starts as the policy

    def sampling_weights(self, trainer) -> contextlib.AbstractContextManager:
        return self.old.swapped_in()

    def update(self, trainer, batch) -> dict[str, float]:
        o = self.options
        adv, valid = group_scores(trainer, batch, o.group_size, o.std, o.std_eps)
        r = optimality(adv, o.adv_clip, o.adv_mode)
        points = trainer.flow_points(batch, o.fm_draws)
        v_old = trainer.point_velocities(batch, points, self.old.swapped_in())
        v_ref = trainer.point_velocities(batch, points, reference=True) if o.kl_weight > 0 else None
        owner, weight = points["owner"], valid.float()[points["owner"]]  # skipped samples: weight 0, same steps

        def loss_with(r: torch.Tensor):
            def policy_loss(idx: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, dict]:
                loss = (weight[idx] * nft_loss(v, v_old[idx], points["target"][idx], points["sigma"][idx],
                                               r[owner[idx]], o.beta, o.adv_clip, o.adaptive_weight)).mean()
                return loss, {"policy_loss": loss}
            return policy_loss

        if trainer.balance is not None:  # MARBLE: the loss is affine in r, so r̄ = Σ c_k r_k / Σ c_k
            per_reward = reward_group_scores(trainer, batch, o.group_size, o.std, o.std_eps)
            r = trainer.balanced(batch, points, {k: optimality(a, o.adv_clip, o.adv_mode) for k, a in
                                                 per_reward.items()}, loss_with, normalise=True)

        def minibatch_loss(idx: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, dict]:
            policy, stats = loss_with(r)(idx, v)
            if v_ref is None:
                return policy, stats
            kl = (weight[idx] * (v - v_ref[idx]).pow(2).flatten(1).mean(1)).mean()
            return policy + o.kl_weight * kl, {"policy_loss": policy, "kl": kl}

        stats = trainer.train_on_points(batch, points, minibatch_loss)
        steps = (batch.iteration + 1) * self.train.updates_per_iteration
        decay = ramp_decay(steps, o.old_decay_rate, o.old_decay_max, o.old_decay_flat)
        self.old.blend(decay)
        return {**stats, "old_decay": decay, "optimality/mean": r[valid].mean().item() if bool(valid.any()) else 0.5,
                **trainer.balance_log()}

    def extra_state(self, trainer) -> tuple[dict, dict]:
        return self.old.state("old."), {}

    def load_extra_state(self, trainer, weights: dict, optimizers: dict) -> None:
        self.old.load(weights, "old.")


# ---------------------------------------------------------------------------- the maths


def optimality(advantages: torch.Tensor, adv_clip: float = 5.0,
               mode: Literal["all", "positive_only", "negative_only", "one_only", "binary"] = "all") -> torch.Tensor:
    """``r = clip(0.5 + A'/(2·adv_clip), 0, 1)`` with ``A' = clip(A, ±adv_clip)`` shaped by ``mode``."""
    a = advantages.float().clamp(-adv_clip, adv_clip)
    if mode == "positive_only":
        a = a.clamp_min(0)
    elif mode == "negative_only":
        a = a.clamp_max(0)
    elif mode == "one_only":
        a = (a > 0).float()
    elif mode == "binary":
        a = torch.sign(a)
    return (a / adv_clip / 2 + 0.5).clamp(0, 1)


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, r: torch.Tensor,
             beta: float, scale: float = 5.0, adaptive: bool = True) -> torch.Tensor:
    """Per point: ``scale·(r·L⁺ + (1-r)·L⁻)/β``, ``L± = mean (σ(v± - u))² / w±``; the x0 error of ``v±`` is
    ``x̂0± - x0 = -σ(v± - u)``, and ``w±`` (no gradient, float64) its mean absolute value, at least 1e-5."""
    s = sigma.float().view(-1, *([1] * (v.ndim - 1)))
    v_old = v_old.detach().float()
    positive, negative = beta * v + (1 - beta) * v_old, (1 + beta) * v_old - beta * v
    losses = []
    for pred in (positive, negative):
        error = s * (pred - target.float())
        w = error.detach().double().abs().flatten(1).mean(1).clamp_min(1e-5) if adaptive else None
        mse = error.pow(2).flatten(1).mean(1)
        losses.append(mse / w.to(mse.dtype) if w is not None else mse)
    r = r.float()
    return scale * (r * losses[0] + (1 - r) * losses[1]) / beta
