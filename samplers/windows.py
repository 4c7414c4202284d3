"""Where the SDE window sits in a trajectory, as a pure function of the training iteration.

A pure function (not a mutable state object) so that a resumed run gets exactly the window it would
have had. Schedules (MixGRPO ``GRPOTrainingStates`` semantics; docs/methods/mix_grpo.md):

- ``fixed``: always at ``start``;
- ``random``: a uniform start in ``[low, high - size]`` per iteration (Flow-GRPO-Fast draws in
  ``[0, num_steps // 2]``, MixGRPO ``random`` in ``[0, max_steps - size]``), seeded by the iteration;
- ``progressive``: stays ``dwell`` iterations, then moves by ``stride`` (``stride = size``: no overlap;
  1: MixGRPO's ``prog_overlap``); past the end it rolls back to ``start`` or stays at the last position
  (``empty_dwell``: first one dwell at the end itself, where the window is empty, as MixGRPO's code does);
- ``decay``: like progressive, with the dwell shrinking linearly from ``dwell`` to ``min_dwell`` as the
  window moves (``min_dwell`` defaults to ``dwell // 4``);
- ``exp_decay``: dwell ``ceil(dwell · exp(-k · max(0, start - threshold)))``.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class WindowSchedule:
    kind: Literal["fixed", "random", "progressive", "decay", "exp_decay"] = "fixed"
    size: int = 4
    start: int = 0
    #: The last step index (exclusive) the window may cover; MixGRPO uses num_steps - 2.
    max_steps: int | None = None
    low: int = 0
    high: int | None = None
    dwell: int = 25
    stride: int = 1
    min_dwell: int | None = None
    roll_back: bool = True
    exp_threshold: int = 13
    exp_k: float = 0.1
    seed: int = 0
    #: MixGRPO's end of cycle: the window also visits position ``max_steps`` (empty: nothing trained) before
    #: rolling back; off, it rolls back after the last position that holds a step.
    empty_dwell: bool = False

    def steps(self, iteration: int, num_steps: int) -> list[int]:
        """The step indices (``i``: σ_i → σ_{i+1}) inside the window at ``iteration``."""
        last = self.max_steps if self.max_steps is not None else num_steps
        if not 0 < self.size <= last:
            raise ValueError(f"window: size {self.size} must be in [1, {last}]")
        begin = self._start(iteration, last)
        return list(range(begin, min(begin + self.size, last)))

    def _start(self, iteration: int, last: int) -> int:
        if self.kind == "fixed":
            return min(self.start, last - self.size)
        if self.kind == "random":
            high = self.high if self.high is not None else last
            return random.Random(self.seed * 1_000_003 + iteration).randint(self.low, max(self.low, high - self.size))
        if self.kind in ("progressive", "decay", "exp_decay"):
            return self._sliding_start(iteration, last)
        raise ValueError(f"window kind {self.kind!r}: expected fixed, random, progressive, decay or exp_decay")

    def _dwell_at(self, position: int, last: int) -> int:
        if self.kind == "decay":
            low = self.min_dwell if self.min_dwell is not None else max(1, self.dwell // 4)
            progress = position / last
            return max(low, int(self.dwell * (1 - progress) + low * progress))
        if self.kind == "exp_decay":
            return max(1, math.ceil(self.dwell * math.exp(-self.exp_k * max(0, position - self.exp_threshold))))
        return self.dwell

    def _sliding_start(self, iteration: int, last: int) -> int:
        """Walk the window forward from ``start``, spending each position's dwell, until ``iteration``."""
        end = last if self.empty_dwell else last - 1  # the last position the window visits
        position, spent = self.start, 0
        while True:
            dwell = self._dwell_at(position, last)
            if iteration < spent + dwell:
                return min(position, end)
            spent += dwell
            position += self.stride
            if position > end:
                if not self.roll_back:
                    return end
                position = self.start
