"""The reward-hacking monitor: guard metrics the run does not optimise, on fixed held-out prompts and seeds.

Every ``monitor.every`` iterations (and once before the first) the policy samples the same held-out prompts
and seeds; the monitor logs the training reward there, each guard reward, the per-prompt diversity and the
distance to the base model's samples on the same seeds. When a guard has fallen by more than its tolerance
since the first evaluation while the reward rose, the run is probably hacking its reward: the monitor warns
once, and with ``on_alarm`` also checkpoints or stops the training.
"""
from __future__ import annotations

import torch

from .. import rewards as reward_lib
from ..inference import generate
from ..rewards.media import pictures
from .lora import adapters_disabled
from .report import heldout_prompts
from .scoring import GuardedEvaluation

MONITOR_SEED = 10_009  # neither a training seed nor the report's


class HackingMonitor:
    """Guard evaluations for one trainer (``trainer.cfg.monitor``); every process computes them alike."""

    def __init__(self, trainer):
        self.trainer, self.cfg = trainer, trainer.cfg.monitor
        prompts, meta = heldout_prompts(self.cfg.prompts, trainer.heldout_file, trainer.world)
        k = self.cfg.samples_per_prompt
        self.prompts = [p for p in prompts for _ in range(k)]
        self.meta = [m for m in meta for _ in range(k)]
        self.guards = {name: reward_lib.load(name).to(trainer.acc.device) for name in self.cfg.guards}
        for guard in self.guards.values():
            guard.requires_grad_(False)
        self.first: dict[str, float] | None = None  # the evaluation before training
        self.alarm: str | None = None
        self._base_media: torch.Tensor | None = None

    @property
    def enabled(self) -> bool:
        return self.cfg.every > 0

    def due(self, iteration: int) -> bool:
        """After ``iteration`` (0-based) completes: every ``every`` iterations, and after the last one."""
        done = iteration + 1
        return self.enabled and (done % self.cfg.every == 0 or done == self.trainer.t.iterations)

    def evaluate(self) -> dict[str, float]:
        """The guard metrics of the policy now (``monitor/*``)."""
        media = self._sample()
        reward = GuardedEvaluation(self.trainer, "the monitor's evaluation")  # raw units: running stats untouched
        values = {"monitor/reward": _mean(reward.score(media, self.prompts, self.meta))}
        for name, guard in self.guards.items():
            values[f"monitor/{name}"] = _mean(guard.score(media, self.prompts, self.meta))
        if self.cfg.samples_per_prompt > 1:
            values["monitor/diversity"] = per_prompt_diversity(media, self.cfg.samples_per_prompt)
        if self.cfg.distance_to_base and self.trainer.lora:
            if self._base_media is None:
                with adapters_disabled(self.trainer.gen.trainable_module, True):
                    self._base_media = self._sample()
            values["monitor/distance_to_base"] = (pictures(media).float() - pictures(self._base_media).float()) \
                .abs().mean().item()
        return values

    def check(self, values: dict[str, float], iteration: int) -> str | None:
        """The alarm line, the first time a guard fell past its tolerance while the reward rose; else None."""
        if self.first is None:
            self.first = dict(values)
            return None
        if self.alarm is not None or values["monitor/reward"] <= self.first["monitor/reward"]:
            return None
        limits = {f"monitor/{name}": drop for name, drop in self.cfg.guards.items()}
        if self.cfg.diversity_drop is not None:
            limits["monitor/diversity"] = self.cfg.diversity_drop
        for key, drop in limits.items():
            start, now = self.first[key], values[key]
            fell = (start - now) / max(abs(start), 1e-8)
            if fell > drop:
                self.alarm = (f"flowalign: reward hacking? {key.removeprefix('monitor/')} fell {start:.3f} -> "
                              f"{now:.3f} ({-fell:+.0%}, tolerance {drop:.0%}) while the reward rose "
                              f"{self.first['monitor/reward']:.3f} -> {values['monitor/reward']:.3f} "
                              f"(after iteration {iteration})")
                return self.alarm
        return None

    def state(self) -> dict:
        return {"first": self.first, "alarm": self.alarm}

    def load_state(self, state: dict) -> None:
        self.first, self.alarm = state.get("first"), state.get("alarm")

    @torch.no_grad()
    def _sample(self) -> torch.Tensor:
        t = self.trainer.t
        return generate(self.trainer.gen, self.prompts, steps=t.eval_steps, guidance=t.guidance, seed=MONITOR_SEED,
                        batch_size=t.rollout_batch, metadata=self.meta)


def _mean(scores: torch.Tensor) -> float:
    finite = scores[torch.isfinite(scores)].float()
    return finite.mean().item() if finite.numel() else float("nan")


def per_prompt_diversity(media: torch.Tensor, per_prompt: int) -> float:
    """The mean over prompts of the Vendi score of their samples' pixels (1: identical samples, k: orthogonal)."""
    from ..rewards.distributional import vendi_score

    flat = pictures(media).float().flatten(1)
    groups = (flat - flat.mean(dim=1, keepdim=True)).view(-1, per_prompt, flat.shape[1])
    return vendi_score(groups).mean().item()


def monitor_summary(first: dict[str, float] | None, history: list[dict], alarm: str | None) -> str:
    """One line: alarm or not, and each guard from the evaluation before training to the last."""
    evaluations = [h for h in history if "monitor/reward" in h]
    if first is None or not evaluations:
        return "monitor: no evaluation"
    last = evaluations[-1]
    moves = ", ".join(f"{k.removeprefix('monitor/')} {first[k]:.3g} -> {last[k]:.3g}" for k in last
                      if k.startswith("monitor/") and k != "monitor/alarm" and k in first)
    return f"monitor: {'alarm' if alarm else 'no alarm'} over {len(evaluations)} evaluations ({moves})"
