"""The parts every forward-process method has: on-policy ODE samples, scored, then a flow-matching
objective at fresh noise levels. No SDE log-probs: any solver samples, and CFG-free training is possible.
The trainer (``flowalign.training.flow_matching``) samples and scores; the method's ``update`` trains."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..typed import bounded
from .base import Method


@dataclass
class FlowMatchingOptions:
    group_size: int = bounded(4, min=1, doc="ODE samples per prompt")
    fm_draws: int = bounded(4, min=1, doc="noise levels drawn per sample for the flow-matching loss")
    fm_sigma: Literal["uniform", "logit_normal"] = bounded("uniform", doc="how those noise levels are drawn")


class FlowMatchingMethod(Method):
    """A forward-process method: ``update(trainer, batch)`` trains on the iteration's scored ODE samples."""

    family = "flow_matching"

    @property
    def scores_pointwise(self) -> bool:
        """Whether the trainer scores each sample before ``update`` (False: the method scores sets itself)."""
        return True

    def update(self, trainer, batch) -> dict[str, float]:
        """Train on ``batch`` (samples, rewards); returns statistics to log."""
        raise NotImplementedError
