"""Advantage Weighted Matching (AWM, arXiv 2509.25050): the pretraining flow-matching loss, weighted by advantage.

On-policy ODE samples without CFG; each sample's group z-score, clipped to ±5 and scaled to [-1, 1], weighs the
flow-matching loss of the clean sample at stratified levels of the sampling grid. The loss enters a PPO form
through a "log-likelihood" ``lp = -ℓ`` (``weighting: uniform``) or its generalised-Huber form
``lp = -σ·((ℓ + 1e-10)^p - 1e-10^p)/p`` (``ghuber``, p 0.25, the code's default), ``ℓ = mean (v - (ε - x0))²``:

    L = mean max(-A·ρ, -A·clip(ρ, 1 - c, 1 + c)) + kl_weight·mean (v - v_ref)² + ema_weight·mean (v - v_ema)²

``ρ = exp(lp - lp_old)`` is 1 on-policy (one update per iteration), so the gradient is ``A·∇(-lp)``. ``v_ref`` is
the LoRA-off base; ``v_ema`` an EMA of the policy, ``θ_ema ← d·θ_ema + (1-d)·θ`` after each iteration,
``d = min(0.001·steps, 0.3)`` (the code's "KL-EMA"). With ``kl_form: elbo`` both distances are divided by
``2g²``, ``g = 0.7·sqrt(σ/(1 - min(σ, 0.99)))``.

Rollouts: ``solver: sa_solver`` samples as the code (SA-Solver, predictor and corrector order 2, τ ``sa_tau`` for
σ in [0.3, 0.9], on the code's grid); the default stays Euler. Paper-approximate: the code's strata are shared by
a micro-batch, here drawn per sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..training.shadow import ShadowWeights, ramp_decay
from ..typed import bounded
from . import register_method
from .base import require
from .flow_matching import FlowMatchingMethod, FlowMatchingOptions, group_scores, require_lora_for, reward_group_scores


@dataclass
class AWMOptions(FlowMatchingOptions):
    group_size: int = bounded(24, min=2, doc="ODE samples per prompt (one group)")
    fm_draws: int = bounded(6, min=1, doc="strata of the sampling grid, one level drawn in each, per sample")
    fm_sigma: Literal["uniform", "logit_normal", "grid", "strata"] = bounded(
        "strata", doc="strata: grid indices [1, int(steps * timestep_fraction)] cut into fm_draws strata")
    timestep_fraction: float = bounded(0.9, min=0.0, max=1.0, doc="the strata end at this share of the grid")
    weighting: Literal["uniform", "ghuber", "huber", "t", "t2"] = bounded(
        "ghuber", doc="lp from the loss: -l, generalised Huber (sigma-weighted l^p), Huber, -sigma*l, -sigma^2*l")
    ghuber_power: float = bounded(0.25, min=1e-3, max=1.0, doc="p of the generalised Huber form")
    adv_clip: float = bounded(5.0, min=1e-6, doc="advantages clipped to +-adv_clip ...")
    advantage_max: float = bounded(1.0, min=0.0, doc="... then scaled to +-advantage_max")
    clip_range: float = bounded(1.0, min=0.0, doc="PPO clip of the ratio (1: none on-policy)")
    kl_weight: float = bounded(0.001, min=0.0, doc="beta of mean (v - v_ref)^2 to the LoRA-off base (GenEval 1e-3)")
    ema_weight: float = bounded(1.0, min=0.0, doc="weight of mean (v - v_ema)^2 to the EMA of the policy")
    kl_form: Literal["uniform", "elbo"] = bounded("uniform", doc="elbo: both distances over 2 g^2")
    ema_decay_rate: float = bounded(0.001, min=0.0, doc="EMA decay d = min(rate * steps, max) after an iteration")
    ema_decay_max: float = bounded(0.3, min=0.0, max=1.0, doc="the EMA reference's largest decay")
    std: Literal["global", "group"] = bounded("global", doc="advantage std over the whole batch or per group")
    std_eps: float = bounded(1e-4, min=0.0, doc="added to the advantage std")
    solver: Literal["euler", "dpm_solver", "sa_solver"] = bounded(
        "euler", doc="the rollout solver: euler, dpm_solver (DPM-Solver++ 2M) or sa_solver (the code's SA-Solver)")
    sa_tau: float = bounded(0.4, min=0.0, doc="sa_solver's stochasticity tau for sigma in [0.3, 0.9] (0: an ODE "
                            "solver; the code: 0.4 GenEval/OCR, 0 PickScore)")


@register_method
class AWM(FlowMatchingMethod):
    name = "awm"
    title = "AWM"
    paper = "arXiv 2509.25050"
    Options = AWMOptions
    skips_failed_samples = True  # a skipped sample weighs 0 in the loss
    balances_rewards = True

    @classmethod
    def check(cls, options, train, modifiers) -> None:
        super().check(options, train, modifiers)
        last = int(train.steps * options.timestep_fraction)
        require(options.fm_sigma != "strata" or last - 1 >= options.fm_draws, f"awm.fm_draws: {options.fm_draws} "
                f"strata need grid indices [1, {last}) to hold as many (train.steps={train.steps}, "
                f"timestep_fraction={options.timestep_fraction})")
        require_lora_for(cls.name, options.kl_weight, train)

    def setup(self, trainer) -> None:
        self.ema = ShadowWeights(trainer.params)

    def noise_levels(self, grid: torch.Tensor, draws: int, generator: torch.Generator) -> torch.Tensor:
        if self.options.fm_sigma != "strata":
            return super().noise_levels(grid, draws, generator)
        return grid[stratified_indices(len(grid), draws, self.options.timestep_fraction, generator)]

    def update(self, trainer, batch) -> dict[str, float]:
        o = self.options
        scale = lambda a: a.clamp(-o.adv_clip, o.adv_clip) / o.adv_clip * o.advantage_max  # noqa: E731
        adv, valid = group_scores(trainer, batch, o.group_size, o.std, o.std_eps)
        adv = scale(adv)
        points = trainer.flow_points(batch, o.fm_draws)
        owner, weight = points["owner"], valid.float()[points["owner"]]
        v_ref = trainer.point_velocities(batch, points, reference=True) if o.kl_weight > 0 else None
        v_ema = trainer.point_velocities(batch, points, self.ema.swapped_in()) if o.ema_weight > 0 else None
        on_policy = self.train.updates_per_iteration == 1
        lp_old = None if on_policy else log_likelihood(trainer.point_velocities(batch, points), points, o)

        def loss_with(adv: torch.Tensor):
            def policy_loss(idx: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, dict]:
                lp = log_likelihood(v, {k: val[idx] for k, val in points.items()}, o)
                old = lp.detach() if lp_old is None else lp_old[idx]
                loss = (weight[idx] * clipped_policy(lp, old, adv[owner[idx]], o.clip_range)).mean()
                return loss, {"policy_loss": loss, "ratio_deviation": (lp - old).detach().exp().sub(1).abs().mean()}
            return policy_loss

        if trainer.balance is not None:  # MARBLE: the loss is linear in the advantage at the sampling policy
            per_reward = reward_group_scores(trainer, batch, o.group_size, o.std, o.std_eps)
            adv = trainer.balanced(batch, points, {k: scale(a) for k, a in per_reward.items()}, loss_with)

        def minibatch_loss(idx: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, dict]:
            part = {k: val[idx] for k, val in points.items()}
            loss, stats = loss_with(adv)(idx, v)
            for name, target, beta in (("kl", v_ref, o.kl_weight), ("ema_kl", v_ema, o.ema_weight)):
                if target is not None:
                    stats[name] = (weight[idx] * velocity_distance(v, target[idx], part["sigma"], o.kl_form)).mean()
                    loss = loss + beta * stats[name]
            return loss, stats

        stats = trainer.train_on_points(batch, points, minibatch_loss)
        steps = (batch.iteration + 1) * self.train.updates_per_iteration
        decay = ramp_decay(steps, o.ema_decay_rate, o.ema_decay_max)
        self.ema.blend(decay)
        return {**stats, "ema_decay": decay, "advantage/abs_mean": adv[valid].abs().mean().item(),
                **trainer.balance_log()}

    def extra_state(self, trainer) -> tuple[dict, dict]:
        return self.ema.state("kl_ema."), {}

    def load_extra_state(self, trainer, weights: dict, optimizers: dict) -> None:
        self.ema.load(weights, "kl_ema.")


# ---------------------------------------------------------------------------- the maths


def stratified_indices(grid_len: int, strata: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """AWM's ``discrete_wo_init``: indices ``[1, int(grid_len·fraction)]`` cut at ``linspace`` boundaries (as
    integers) into ``strata`` ranges, one index drawn uniformly in each (σ = 1, index 0, left out)."""
    bounds = torch.linspace(1, int(grid_len * fraction), strata + 1).long()
    low, high = bounds[:-1], bounds[1:]
    return low + (torch.rand(strata, generator=generator) * (high - low)).long()


def log_likelihood(v: torch.Tensor, points: dict[str, torch.Tensor], options) -> torch.Tensor:
    """Per point, AWM's ``lp`` from the flow-matching loss ``ℓ = mean (v - u)²`` (float64, as the code)."""
    loss = (v.double() - points["target"].double()).pow(2).flatten(1).mean(1)
    sigma = points["sigma"].double()
    kind, p = options.weighting, options.ghuber_power
    if kind == "ghuber":
        return -((loss + 1e-10) ** p - 1e-10 ** p) * sigma / p
    if kind == "huber":
        return -((loss + 1e-10).sqrt() - 1e-5) * sigma
    return -loss * {"uniform": 1.0, "t": sigma, "t2": sigma ** 2}[kind]


def clipped_policy(lp: torch.Tensor, lp_old: torch.Tensor, adv: torch.Tensor, clip: float) -> torch.Tensor:
    """Per point ``max(-A·ρ, -A·clip(ρ, 1 - c, 1 + c))``, ``ρ = exp(lp - lp_old)``."""
    ratio = torch.exp(lp - lp_old.detach())
    adv = adv.to(ratio.dtype)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).float()


def velocity_distance(v: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor,
                      form: Literal["uniform", "elbo"]) -> torch.Tensor:
    """Per point ``mean (v - target)²``, over ``2g²`` with ``g = 0.7·sqrt(σ/(1 - min(σ, 0.99)))`` for ``elbo``."""
    dist = (v.float() - target.float()).pow(2).flatten(1).mean(1)
    if form == "elbo":
        g2 = 0.49 * sigma.float() / (1 - sigma.float().clamp(max=0.99))
        dist = dist / (2 * g2)
    return dist
