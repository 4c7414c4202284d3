"""What a training method and a modifier are.

A **method** is one file: a name, an options dataclass carrying the paper's defaults, the trainer family that
runs it (``policy_gradient``: SDE rollouts and clipped ratios; ``flow_matching``: forward-process losses on
ODE samples), and the parts that family asks for. A **modifier** (GRPO-Guard, CPS, KL, ...) adds or swaps one
part and declares the methods it combines with. The trainers call parts and hooks; they never test a name.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ..typed import ConfigError

if TYPE_CHECKING:
    from ..config import TrainConfig


class Method:
    """A registered training method (see ``flowalign.methods.register_method``)."""

    name: ClassVar[str]
    title: ClassVar[str]                    # how papers and tables name it, e.g. "Flow-GRPO"
    paper: ClassVar[str] = ""               # where it comes from, e.g. "arXiv 2505.05470"
    family: ClassVar[str]                   # the trainer that runs it: "policy_gradient" | "flow_matching"
    Options: ClassVar[type]                 # a dataclass; its defaults are the paper's
    #: why a prompt's samples must run on one process (placed whole, prompt p on process p % world; None: they
    #: may be spread one by one)
    whole_prompts: ClassVar[str | None] = None
    #: whether it may train the conditional velocity (``train.cfg: false``) on samples drawn with CFG: true where
    #: the loss compares samples with each other rather than fitting them (DGPO)
    guided_rollouts: ClassVar[bool] = False
    #: whether the prompts are encoded with the CFG negative branch even when sampling is unguided (an instance
    #: attribute may depend on the options: DGPO's reference with CFG)
    negative_branch: bool = False
    #: whether it trains around samples whose reward failed (``reward.on_error: skip``: NaN rewards weigh nothing)
    skips_failed_samples: ClassVar[bool] = False
    #: whether its loss is linear in each sample's advantage (or weight), so MARBLE can balance several rewards
    #: there (``reward.aggregate: marble``)
    balances_rewards: ClassVar[bool] = False

    def __init__(self, options: Any, train: "TrainConfig", modifiers: dict[str, "Modifier"] | None = None):
        self.options, self.train = options, train
        self.modifiers = dict(modifiers or {})

    @classmethod
    def check(cls, options: Any, train: "TrainConfig", modifiers: dict[str, Any]) -> None:
        """Cross-field rules between the method's options, the trainer's and the modifiers' (ConfigError)."""

    @property
    def samples_per_prompt(self) -> int:
        """Leaves (scored samples) per prompt and iteration."""
        return self.options.group_size

    def setup(self, trainer) -> None:
        """Build what the method trains beside the policy (a critic), once the trainer is ready."""

    def extra_state(self, trainer) -> tuple[dict[str, Any], dict[str, Any]]:
        """Weights (name-prefixed) and optimizer states beyond the policy's, for checkpoints."""
        return {}, {}

    def load_extra_state(self, trainer, weights: dict[str, Any], optimizers: dict[str, Any]) -> None:
        """Restore what ``extra_state`` saved."""


class Modifier:
    """An option that combines with several methods; each hook's default leaves the method as it is."""

    name: ClassVar[str]
    title: ClassVar[str]
    Options: ClassVar[type]
    #: method names, or trainer families ("policy_gradient") meaning every method of that family
    combines_with: ClassVar[frozenset[str]]
    #: method name -> another modifier this one needs with it (Flash on Flow-GRPO needs the Fast window)
    requires: ClassVar[dict[str, str]] = {}
    whole_prompts: ClassVar[str | None] = None   # as ``Method.whole_prompts``

    def __init__(self, options: Any, method: Method):
        self.options, self.method = options, method

    @classmethod
    def check(cls, options: Any, method: str, method_options: Any, train: "TrainConfig",
              modifiers: dict[str, Any]) -> None:
        """Rules beyond ``combines_with`` (ConfigError)."""

    def setup(self, trainer) -> None:
        """Build what the modifier keeps across iterations (a reference copy), once the trainer is ready."""

    def extra_state(self, trainer) -> tuple[dict[str, Any], dict[str, Any]]:
        """Weights (name-prefixed) and plain values (JSON) to checkpoint."""
        return {}, {}

    def load_extra_state(self, trainer, weights: dict[str, Any], values: dict[str, Any]) -> None:
        """Restore what ``extra_state`` saved."""

    # ---- hooks of the policy-gradient family (trainers call every modifier's; defaults change nothing)

    def leaf_advantages(self, trainer, batch, rewards, groups, valid):
        """Every leaf's advantage (the gathered order, ``[L]``) in place of the method's, or None."""
        return None

    def noise_schedule(self, schedule):
        """The SDE noise schedule the rollouts and log-probs use (CPS swaps it)."""
        return schedule

    def rollout_grid(self, sigmas, tail, window: list[int] | None):
        """``(grid the SDE rollout runs on, tail grid a solver finishes on or None)`` (Flash splits the grid)."""
        return sigmas, tail

    def finish_rollout(self, rollout, tail, velocity, batch_size: int):
        """Finish the rollout's leaves on ``tail`` (Flash: DPM-Solver++)."""
        return rollout

    def log_ratio(self, out, old_logp, rollout, idx):
        """``(log-ratio, loss divisor)`` replacing ``logp - old_logp`` (GRPO-Guard), or None."""
        return None

    def prepare(self, trainer, batch) -> None:
        """Per-iteration data the loss term needs, written into ``batch.extras[self.name]``."""

    def loss_term(self, trainer, batch, idx, velocity, out):
        """``(weighted term added to the loss, {stat name: raw value})`` for a minibatch, or None."""
        return None

    def optimizer_stepped(self, trainer) -> None:
        """After each optimizer step of the policy (GARDO's per-step reset test)."""


def require(condition: bool, message: str) -> None:
    """A cross-field rule: one-line ConfigError when it does not hold."""
    if not condition:
        raise ConfigError(message)
