"""GRPO-Guard (flow_grpo's `rationorm`; Pref-GRPO's code turns it on by default): normalised, centred ratios.

``b = mean((μ_θ - μ_old)²) / (2(g·sqrt(Δ))²)``, ``log r = (logp - logp_old + b)·sqrt(Δ)·g`` with g the step's
diffusion coefficient and ``Δ = |Δσ|`` of each sample's own step (``scale: per_sample``, the references': their
minibatches hold one step, flowalign's mix steps) or ``Δ̄ = mean(sqrt|Δσ|)²`` over the minibatch
(``scale: batch``); the policy loss is divided by it, sample by sample.
Adding b centres the log-ratio (zero mean under the old policy), the scaling removes the per-step drift
that lets low-noise steps dominate the clip. Its papers use clip ranges of 2e-6 to 4e-6.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..algorithms.grpo.loss import guard_log_ratio
from ..methods import register_modifier
from ..methods.base import Modifier
from ..typed import bounded


@dataclass
class GRPOGuardOptions:
    scale: Literal["per_sample", "batch"] = bounded(
        "per_sample", doc="per_sample: each sample's own step scale and loss divisor (the references', whose "
        "batches hold one step); batch: the minibatch mean, which mixes steps in shuffled minibatches")


@register_modifier
class GRPOGuard(Modifier):
    name = "grpo_guard"
    title = "GRPO-Guard"
    Options = GRPOGuardOptions
    combines_with = frozenset({"policy_gradient"})

    def log_ratio(self, out, old_logp, rollout, idx):
        return guard_log_ratio(out.logp, old_logp, out.mean, rollout.mean[idx], out.std, rollout.sigma[idx],
                               rollout.sigma_next[idx], self.options.scale)
