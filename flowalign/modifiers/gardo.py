"""GARDO (arXiv 2512.24138; flow_grpo's ``scripts/train_sd3_gardo.py``): hold reward hacking off without paying a
KL on every sample, on Flow-GRPO.

- **Gated KL**: each iteration the samples of the whole batch are ranked by the trained reward and by auxiliary
  rewards (rank 1 the best); ``u = mean auxiliary rank - trained reward's rank`` is large where the trained
  reward likes a sample much more than the auxiliaries do (``uncertainty: proxy_ahead``, the paper's
  description; ``auxiliaries_ahead`` is the sign of the released code, ``u = rank_main - mean rank_aux``). Of
  the samples with ``u >= 0`` those above the ``100(1-κ)`` percentile pay ``β·KL``; a risk compensator moves
  κ (10% to start, 2% to 20%) by ±10% when the mean non-negative ``u`` leaves the range of its last 20 values.
- **Adaptive reference**: the KL is to a copy of the policy (at the start, the base), reset to the policy at the
  next iteration once the gated samples' mean KL exceeded ``kl_threshold``, and at the latest every
  ``reset_every`` iterations.
- **Diversity-aware advantages**: ``A_i = (R_i - mean_group R)·m_i`` (no std division) with
  ``m_i = d_i / mean_group d`` for samples at or above their group's mean reward (1 otherwise), ``d_i`` the
  cosine distance to the nearest other sample of the group. Paper-approximate: the features are the samples'
  centred pixels, where the paper uses DINOv3 ViT-L/16 embeddings.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from .. import rewards as reward_lib
from ..methods import register_modifier
from ..methods.base import Modifier, require
from ..samplers.kernels import kl_to_reference, step_mean
from ..training.shadow import ShadowWeights
from ..typed import bounded


@dataclass
class GARDOOptions:
    beta: float = bounded(0.04, min=0.0, doc="weight of the gated KL (the paper: 0.04 OCR, 0.07 GenEval, 0.01 FLUX "
                                             "with HPS)")
    auxiliaries: list[str] = bounded([], doc="rewards the gate ranks samples by besides "
                                     "the trained one (scored for the gate only; the paper: aesthetic, imagereward)")
    uncertainty: Literal["proxy_ahead", "auxiliaries_ahead"] = bounded(
        "proxy_ahead", doc="gate the samples the trained reward ranks far above the auxiliaries (the paper), or "
        "far below them (the sign of the released code)")
    gate_fraction: float = bounded(0.1, min=0.0, max=1.0, doc="κ at the start: the share of the non-negative "
                                                              "uncertainties that is gated")
    gate_min: float = bounded(0.02, min=0.0, max=1.0, doc="the smallest κ")
    gate_max: float = bounded(0.2, min=0.0, max=1.0, doc="the largest κ")
    gate_step: float = bounded(0.1, min=0.0, max=1.0, doc="κ is multiplied by 1 ± gate_step")
    gate_window: int = bounded(20, min=1, doc="iterations of mean uncertainty the compensator compares with")
    adaptive_reference: bool = bounded(True, doc="KL to a copy of the policy reset now and then (false: to the "
                                                 "LoRA-off base)")
    kl_threshold: float = bounded(3e-4, min=0.0, doc="reset the reference after an iteration whose gated samples' "
                                                     "mean KL exceeded this")
    reset_every: int = bounded(15, min=0, doc="reset at the latest after this many iterations (0: only by "
                                              "kl_threshold)")
    diversity: bool = bounded(True, doc="diversity-aware advantages (replacing the method's group z-scores)")


@register_modifier
class GARDO(Modifier):
    name = "gardo"
    title = "GARDO"
    Options = GARDOOptions
    combines_with = frozenset({"flow_grpo"})

    @classmethod
    def check(cls, options, method, method_options, train, modifiers) -> None:
        require(train.lora_rank > 0, "modifiers.gardo keeps its reference as a LoRA copy: it needs train.lora_rank > 0")
        require(options.beta == 0 or bool(options.auxiliaries), "modifiers.gardo.auxiliaries: the gate ranks samples "
                "by other rewards too, expected at least one (or beta 0)")
        require(options.gate_min <= options.gate_fraction <= options.gate_max,
                "modifiers.gardo: expected gate_min <= gate_fraction <= gate_max")
        from ..rewards.registry import known

        unknown = [n for n in options.auxiliaries if not known(n)]
        require(not unknown, f"modifiers.gardo.auxiliaries: unknown reward '{unknown[0] if unknown else ''}'")
        require("kl" not in modifiers, "modifiers.gardo has its own (gated) KL: leave modifiers.kl out")

    def setup(self, trainer) -> None:
        options = trainer.cfg.reward.options
        self.auxiliaries = {n: reward_lib.load(n, **options.get(n, {})).to(trainer.acc.device).requires_grad_(False)
                            for n in self.options.auxiliaries}
        self.reference = ShadowWeights(trainer.params) if self.options.adaptive_reference else None
        self.compensator = RiskCompensator(self.options)
        self.last_reset, self.resets = 0, 0
        self.kl_sum = torch.zeros((), device=trainer.acc.device)
        self.kl_count = torch.zeros((), device=trainer.acc.device)

    # ---------------------------------------------------------------- advantages

    def leaf_advantages(self, trainer, batch, rewards, groups, valid):
        if not self.options.diversity:
            return None
        features, _ = trainer.gathered(pixel_features(batch.media), batch)
        return diversity_advantages(rewards, groups, features, valid)

    # ---------------------------------------------------------------- the gate and the reference

    def prepare(self, trainer, batch) -> None:
        if self.reference is not None and self._reset_due(trainer, batch.iteration):
            self.reference.blend(0.0)
            self.last_reset, self.resets = batch.iteration, self.resets + 1
        self.kl_sum.zero_(), self.kl_count.zero_()
        leaves = self._gated_leaves(trainer, batch)
        gate = (batch.rollout.transition_leaves & leaves[None, :]).any(dim=1)
        counts = trainer.acc.reduce(torch.stack([gate.sum(), torch.tensor(len(gate), device=gate.device)]).float(),
                                    "sum")
        batch.extras[self.name] = {"gate": gate, "share": counts[0] / counts[1],  # of every process's transitions
                                   "ref_mean": self._reference_means(trainer, batch, gate)}

    def _reset_due(self, trainer, iteration: int) -> bool:
        """The anchor's rule: after an iteration whose KL passed the threshold, or ``reset_every`` without one."""
        sums = trainer.acc.reduce(torch.stack([self.kl_sum, self.kl_count]), "sum")
        crossed = bool(sums[1] > 0) and float(sums[0] / sums[1]) > self.options.kl_threshold
        forced = self.options.reset_every > 0 and iteration - self.last_reset > self.options.reset_every
        return (iteration != 0 and crossed) or forced

    def _gated_leaves(self, trainer, batch) -> torch.Tensor:
        """This process's leaves that pay the KL (decided over the whole gathered batch)."""
        if self.options.beta == 0:
            return torch.zeros(len(batch.leaf_ids), dtype=torch.bool, device=batch.leaf_ids.device)
        prompts, metadata = batch.leaf_prompts, batch.leaf_metadata()
        with torch.no_grad():
            aux = [trainer.gathered(r.score(batch.media, prompts, metadata).detach().float(), batch)
                   for r in self.auxiliaries.values()]
        position = aux[0][1]
        u = uncertainty(batch.all_rewards.float(), torch.stack([a for a, _ in aux]), self.options.uncertainty)
        nonneg = u[u >= 0]
        fraction = self.compensator.update(nonneg.mean().item() if nonneg.numel() else 0.0)
        return gate(u, fraction)[position]

    @torch.no_grad()
    def _reference_means(self, trainer, batch, gate: torch.Tensor) -> torch.Tensor:
        """The reference's step means at the gated transitions (zeros elsewhere)."""
        rollout = batch.rollout
        means = torch.zeros_like(rollout.x, dtype=torch.float32)
        gated = gate.nonzero().squeeze(1)
        weights = self.reference.swapped_in() if self.reference is not None else contextlib.nullcontext()
        with weights:
            for start in range(0, len(gated), trainer.t.train_batch):
                idx = gated[start:start + trainer.t.train_batch]
                v = trainer.velocity(batch, idx, reference=self.reference is None)
                means[idx], _ = step_mean(v, rollout.x[idx], rollout.sigma[idx], rollout.sigma_next[idx],
                                          trainer.schedule, rollout.scale[idx])
        return means

    def loss_term(self, trainer, batch, idx, velocity, out):
        extras, rollout = batch.extras[self.name], batch.rollout
        gate = extras["gate"][idx].float()
        kl = kl_to_reference(out.mean, extras["ref_mean"][idx], out.std, rollout.sigma[idx], rollout.sigma_next[idx],
                             "flow_grpo", trainer.schedule.coefficient_preserving)
        # the mean over the iteration's gated transitions, as a mean over all of them (the trainer's minibatch
        # and process weighting) of kl·gate / the gated share: the same on any number of processes
        term = (kl * gate).mean() / extras["share"].clamp_min(1e-12)
        self.kl_sum += (kl.detach() * gate).sum()
        self.kl_count += gate.sum()
        gated_kl = (kl.detach() * gate).sum() / gate.sum().clamp_min(1.0)
        return self.options.beta * term, {"kl": gated_kl, "gated": gate.mean(),
                                              "gate_fraction": torch.tensor(self.compensator.fraction),
                                              "reference_resets": torch.tensor(float(self.resets))}

    # ---------------------------------------------------------------- checkpoints

    def extra_state(self, trainer):
        weights = self.reference.state("gardo.reference.") if self.reference is not None else {}
        values = {"fraction": self.compensator.fraction, "history": list(self.compensator.history),
                  "last_reset": self.last_reset, "resets": self.resets,
                  "kl": [float(self.kl_sum), float(self.kl_count)]}
        return weights, values

    def load_extra_state(self, trainer, weights, values) -> None:
        if self.reference is not None:
            self.reference.load(weights, "gardo.reference.")
        if values:
            self.compensator.fraction, self.compensator.history = values["fraction"], list(values["history"])
            self.last_reset, self.resets = values["last_reset"], values["resets"]
            self.kl_sum.fill_(values["kl"][0]), self.kl_count.fill_(values["kl"][1])


# ---------------------------------------------------------------------------- the maths


class RiskCompensator:
    """κ, the gated share: ×(1+step) when the mean non-negative uncertainty exceeds every one of the last
    ``window``, ×(1-step) when it is below every one, kept in [gate_min, gate_max]."""

    def __init__(self, options: GARDOOptions):
        self.options, self.fraction, self.history = options, options.gate_fraction, []

    def update(self, value: float) -> float:
        o = self.options
        if self.history and value > max(self.history):
            self.fraction *= 1 + o.gate_step
        elif self.history and value < min(self.history):
            self.fraction *= 1 - o.gate_step
        self.fraction = min(max(self.fraction, o.gate_min), o.gate_max)
        self.history = [*self.history, value][-o.gate_window:]
        return self.fraction


def descending_ranks(scores: torch.Tensor) -> torch.Tensor:
    """1 for the highest score, n for the lowest (ties: the earlier sample first)."""
    order = torch.argsort(scores, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(scores) + 1, device=scores.device)
    return ranks.float()


def uncertainty(main: torch.Tensor, auxiliaries: torch.Tensor,
                sign: Literal["proxy_ahead", "auxiliaries_ahead"] = "proxy_ahead") -> torch.Tensor:
    """``mean_k rank(aux_k) - rank(main)`` over the batch (``proxy_ahead``) or its negation; a sample with a NaN
    (skipped) reward gets -inf (never gated)."""
    valid = torch.isfinite(main) & torch.isfinite(auxiliaries).all(dim=0)
    u = torch.full_like(main, float("-inf"))
    if bool(valid.any()):
        aux = torch.stack([descending_ranks(a[valid]) for a in auxiliaries]).mean(dim=0)
        ahead = aux - descending_ranks(main[valid])
        u[valid] = ahead if sign == "proxy_ahead" else -ahead
    return u


def gate(u: torch.Tensor, fraction: float) -> torch.Tensor:
    """The samples above the ``100(1 - fraction)`` percentile (linear interpolation) of the non-negative ``u``."""
    nonneg = u[u >= 0]
    if not nonneg.numel():
        return torch.zeros_like(u, dtype=torch.bool)
    return u > torch.quantile(nonneg.float(), 1.0 - fraction)


def pixel_features(media: torch.Tensor) -> torch.Tensor:
    """Each sample's pixels, centred and L2-normalised ([B, D]); stands in for the paper's DINOv3 embeddings."""
    flat = media.detach().float().flatten(1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


def diversity_advantages(rewards: torch.Tensor, groups: torch.Tensor, features: torch.Tensor,
                         valid: torch.Tensor) -> torch.Tensor:
    """``(R_i - mean_group R)·m_i``; ``m_i = d_i / mean_group d`` where ``R_i >= mean``, else 1; ``d_i`` the
    cosine distance to the nearest other valid sample of the group. Invalid samples get 0."""
    adv = torch.zeros_like(rewards)
    for g in torch.unique(groups[valid]):
        members = (valid & (groups == g)).nonzero().squeeze(1)
        centred = rewards[members] - rewards[members].mean()
        if len(members) < 2:
            adv[members] = centred
            continue
        f = features[members]
        distance = 1 - (f @ f.T).clamp(-1, 1)
        distance.fill_diagonal_(float("inf"))
        nearest = distance.min(dim=1).values
        multiplier = torch.where(centred >= 0, nearest / nearest.mean().clamp_min(1e-12), torch.ones_like(nearest))
        adv[members] = centred * multiplier
    return adv
