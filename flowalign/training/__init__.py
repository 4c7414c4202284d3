"""Training on accelerate: the base trainer and its two families, checkpoints (atomic, resumable), reports."""
from __future__ import annotations

from ..config import RunConfig
from .prompts import read_prompt_file


def make_trainer(cfg: RunConfig, accelerator=None):
    """The trainer of the run's method's family (``policy_gradient`` or ``flow_matching``)."""
    from ..methods import get_method
    from .flow_matching import FlowMatchingTrainer
    from .policy_gradient import PolicyGradientTrainer

    families = {"policy_gradient": PolicyGradientTrainer, "flow_matching": FlowMatchingTrainer}
    return families[get_method(cfg.method).family](cfg, accelerator)


__all__ = ["make_trainer", "read_prompt_file"]
