"""KL to the reference policy (the LoRA-off base) as a loss term, ``β·KL`` (Flow-GRPO's ``train.beta``).

Between the policy's and the reference's SDE step means ``μ_θ``, ``μ_ref`` at the stored state:
``flow_grpo``: ``mean((μ_θ - μ_ref)²) / (2·g²)`` with g the diffusion coefficient without sqrt(Δσ), as
Flow-GRPO's code (late steps weigh more), and under CPS ``/(2·std²)`` with the step's actual std, as its CPS
step returns; ``gaussian``: the exact Gaussian KL, ``/(2·std²)``.
The reference is the same weights with the LoRA switched off, so it needs LoRA training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..methods import register_modifier
from ..methods.base import Modifier, require
from ..samplers.kernels import kl_to_reference, step_mean
from ..typed import bounded


@dataclass
class KLOptions:
    beta: float = bounded(0.04, min=0.0, doc="weight of the KL term (Flow-GRPO: 0.04 GenEval/OCR, 0.01 PickScore)")
    denominator: Literal["flow_grpo", "gaussian"] = bounded(
        "flow_grpo", doc="flow_grpo: the anchor's /(2 g^2) without dt (under CPS: /(2 std^2)); gaussian: the exact "
                         "KL")

@register_modifier
class KL(Modifier):
    name = "kl"
    title = "KL to the LoRA-off base"
    Options = KLOptions
    combines_with = frozenset({"policy_gradient"})

    @classmethod
    def check(cls, options, method, method_options, train, modifiers) -> None:
        require(train.lora_rank > 0, "modifiers.kl compares with the LoRA-off base: it needs train.lora_rank > 0")

    def loss_term(self, trainer, batch, idx, velocity, out):
        rollout = batch.rollout
        v_ref = trainer.velocity(batch, idx, reference=True)
        ref_mean, _ = step_mean(v_ref, rollout.x[idx], rollout.sigma[idx], rollout.sigma_next[idx], trainer.schedule,
                                rollout.scale[idx])
        kl = kl_to_reference(out.mean, ref_mean, out.std, rollout.sigma[idx], rollout.sigma_next[idx],
                             self.options.denominator, trainer.schedule.coefficient_preserving).mean()
        return self.options.beta * kl, {"kl": kl.detach()}
