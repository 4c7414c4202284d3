"""GARDO (arXiv 2512.24138; flow_grpo's ``scripts/train_sd3_gardo.py``): hold reward hacking off without paying a
KL on every sample, on Flow-GRPO.

- **Gated KL**: each iteration the samples of the whole batch are ranked by the trained reward and by auxiliary
  rewards (rank 1 the best); ``u = mean auxiliary rank - trained reward's rank`` is large where the trained
  reward likes a sample much more than the auxiliaries do (``uncertainty: proxy_ahead``, the paper's
  description; ``auxiliaries_ahead`` is the sign of the released code, ``u = rank_main - mean rank_aux``). Of
  the samples with ``u >= 0`` those above the ``100(1-κ)`` percentile pay ``β·KL``; a risk compensator moves
  κ (10% to start, 2% to 20%) by ±10% when the mean non-negative ``u`` leaves the range of its last 20 values.
- **Adaptive reference**: the KL is to a copy of the policy (at the start, the base), reset to the policy at the
  next iteration once the gated samples' mean KL exceeded ``kl_threshold`` (``reset_test: iteration``; the
  anchor's ``optimizer_step``: an optimizer step's mean micro-batch gated KL did), and at the latest every
  ``reset_every`` iterations.
- **Diversity-aware advantages**: ``A_i = (R_i - mean_group R)·m_i`` (no std division) with
  ``m_i = d_i / mean_group d`` for samples at or above their group's mean reward (1 otherwise), ``d_i`` the
  cosine distance to the nearest other sample of the group, by the samples' centred pixels (``features:
  pixels``, paper-approximate) or an image encoder's embeddings (the paper: ``features: dinov3``, ViT-L/16).
"""
from __future__ import annotations

import contextlib
import importlib
import typing
from dataclasses import dataclass
from typing import Literal

import torch

from .. import rewards as reward_lib
from ..errors import FlowalignError
from ..methods import register_modifier
from ..methods.base import Modifier, require
from ..rewards.media import pictures
from ..samplers.kernels import kl_to_reference, step_mean
from ..training.shadow import ShadowWeights
from ..typed import bounded
from .gardo_maths import (  # noqa: F401 - descending_ranks: part of this module's interface
    ResetTest,
    RiskCompensator,
    descending_ranks,
    diversity_advantages,
    encoder_features,
    gate,
    pixel_features,
    uncertainty,
)


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
    kl_threshold: float = bounded(3e-4, min=0.0, doc="reset the reference after an iteration whose gated KL "
                                                     "exceeded this (as reset_test measures it)")
    reset_test: Literal["iteration", "optimizer_step"] = bounded(
        "iteration", doc="the gated KL kl_threshold tests: the mean over the iteration's gated transitions, or "
        "(the anchor's) each optimizer step's mean over its micro-batches of their gated KL")
    reset_every: int = bounded(15, min=0, doc="reset at the latest after this many iterations (0: only by "
                                              "kl_threshold)")
    diversity: bool = bounded(True, doc="diversity-aware advantages (replacing the method's group z-scores)")
    features: str = bounded("pixels", doc="what the diversity distances compare: the centred pixels, or the "
                            "embeddings of a reward that embeds images (options from reward.options; the paper: "
                            "dinov3)")


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
        if options.features != "pixels":
            require(known(options.features), f"modifiers.gardo.features: unknown encoder '{options.features}' "
                    "(expected pixels or a reward that embeds images, e.g. dinov3)")
            require(embeds_images(options.features), f"modifiers.gardo.features: reward '{options.features}' "
                    "cannot embed images (expected pixels or a reward with embed_images, e.g. dinov3)")

    def setup(self, trainer) -> None:
        options = trainer.cfg.reward.options
        self.auxiliaries = {n: reward_lib.load(n, **options.get(n, {})).to(trainer.acc.device).requires_grad_(False)
                            for n in self.options.auxiliaries}
        self.reference = ShadowWeights(trainer.params) if self.options.adaptive_reference else None
        self.compensator = RiskCompensator(self.options)
        self.last_reset, self.resets = 0, 0
        self.reset_test = ResetTest(self.options.reset_test, self.options.kl_threshold, trainer.acc.device)
        name = self.options.features
        self.encoder = None if name == "pixels" or not self.options.diversity else \
            reward_lib.load(name, **options.get(name, {})).to(trainer.acc.device).requires_grad_(False)

    def optimizer_stepped(self, trainer) -> None:
        """Close the reset test's optimizer step (it counts only with ``reset_test: optimizer_step``)."""
        if self.options.reset_test == "optimizer_step":
            self.reset_test.end_step()

    # ---------------------------------------------------------------- advantages

    def leaf_advantages(self, trainer, batch, rewards, groups, valid):
        if not self.options.diversity:
            return None
        features, _ = trainer.gathered(self.features(pictures(batch.media)), batch)
        return diversity_advantages(rewards, groups, features, valid)

    def features(self, media: torch.Tensor) -> torch.Tensor:
        """What the diversity distances compare, per sample ``[B, D]``, L2-normalised."""
        if self.encoder is None:
            return pixel_features(media)
        if media.ndim != 4 or media.shape[1] != 3:
            raise FlowalignError(f"modifiers.gardo.features: {self.options.features} embeds images [B,3,H,W], this "
                                 f"model makes media of shape {tuple(media.shape)} (use features: pixels)")
        return encoder_features(self.encoder.embed_images, media)

    # ---------------------------------------------------------------- the gate and the reference

    def prepare(self, trainer, batch) -> None:
        if self.reference is not None and self._reset_due(trainer, batch.iteration):
            self.reference.blend(0.0)
            self.last_reset, self.resets = batch.iteration, self.resets + 1
        self.reset_test.clear()
        leaves = self._gated_leaves(trainer, batch)
        gate = (batch.rollout.transition_leaves & leaves[None, :]).any(dim=1)
        counts = trainer.acc.reduce(torch.stack([gate.sum(), torch.tensor(len(gate), device=gate.device)]).float(),
                                    "sum")
        batch.extras[self.name] = {"gate": gate, "share": counts[0] / counts[1],  # of every process's transitions
                                   "ref_mean": self._reference_means(trainer, batch, gate)}

    def _reset_due(self, trainer, iteration: int) -> bool:
        """The anchor's rule: after an iteration whose KL passed the threshold, or ``reset_every`` without one."""
        crossed = self.reset_test.crossed(trainer.acc.reduce)
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
        gated_kl = self.reset_test.add(kl, gate)
        return self.options.beta * term, {"kl": gated_kl, "gated": gate.mean(),
                                              "gate_fraction": torch.tensor(self.compensator.fraction),
                                              "reference_resets": torch.tensor(float(self.resets))}

    # ---------------------------------------------------------------- checkpoints

    def extra_state(self, trainer):
        weights = self.reference.state("gardo.reference.") if self.reference is not None else {}
        values = {"fraction": self.compensator.fraction, "history": list(self.compensator.history),
                  "last_reset": self.last_reset, "resets": self.resets, **self.reset_test.state()}
        return weights, values

    def load_extra_state(self, trainer, weights, values) -> None:
        if self.reference is not None:
            self.reference.load(weights, "gardo.reference.")
        if values:
            self.compensator.fraction, self.compensator.history = values["fraction"], list(values["history"])
            self.last_reset, self.resets = values["last_reset"], values["resets"]
            self.reset_test.load(values)


def embeds_images(name: str) -> bool:
    """Whether the reward ``name`` (known) has ``embed_images``, read from its class without loading it."""
    from ..rewards.registry import reward_class

    target = reward_class(name)
    if not isinstance(target, type):  # a factory: the class it names or declares it returns
        returns = getattr(target, "returns", None)
        if isinstance(returns, str):
            module, _, attr = returns.partition(":")
            target = getattr(importlib.import_module(module), attr)
        else:
            target = typing.get_type_hints(target).get("return", target)
    return hasattr(target, "embed_images")

