"""ORW-CFM-W2 (online reward-weighted conditional flow matching with a W2 bound): AC-Flow without a critic.

On-policy ODE samples, the flow-matching loss weighted by ``w = exp(β·r)`` of the raw reward (unclipped,
unnormalised, as its code), plus ``α·||v_θ - v_ref||²`` to the LoRA-off base with α 1 (its "use α >= 1").
With rewards on a large scale the unnormalised weights overpower the bound; AC-Flow's shaping, normalised
weights and critic address that.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..typed import bounded
from . import register_method
from .ac_flow import ACFlow
from .flow_matching import FlowMatchingOptions


@dataclass
class ORWOptions(FlowMatchingOptions):
    weight_beta: float = bounded(0.5, min=0.0, doc="weights exp(weight_beta * r) of the raw reward")
    weight_norm: bool = bounded(False, doc="divide the weights by their batch mean (off in the paper)")
    w2_weight: float = bounded(1.0, min=0.0, doc="alpha of the W2 bound ||v - v_ref||^2 to the LoRA-off base")


@register_method
class ORWCFMW2(ACFlow):
    name = "orw_cfm_w2"
    title = "ORW-CFM-W2"
    paper = "ICLR 2025 (online reward-weighted CFM with W2 regularisation)"
    Options = ORWOptions
    uses_critic = False
