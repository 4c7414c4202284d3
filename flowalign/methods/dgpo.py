"""DGPO (arXiv 2510.08425): Direct Group Preference Optimization, Diffusion-DPO from pairs to groups.

A prompt's group of ODE samples splits by advantage into G⁺ (A > 0) and G⁻ (A < 0); DGPO maximises
``log σ(R(G⁺) - R(G⁻))`` with ``R(G) = Σ_{x∈G} |A_x|·β_dpo·log(p_θ/p_ref)`` and Diffusion-DPO's surrogate
``log p_θ/p_ref ≈ -(ℓ_θ - ℓ_ref)``, ``ℓ = mean (v - (ε - x0))²``. Its gradient is that of

    L = mean_i sg(σ(s_g(i)))·A_i·ℓ_θ,i + kl_weight·mean (v - v_ref)²,   s_g = Σ_{i∈g} A_i·β_dpo·(ℓ_θ,i - ℓ_ref,i)/G

(without gradient through ``s_g``): a group already well ordered gets a small weight. Every member of a group
shares the noise ε at each of ``fm_draws`` grid levels drawn (without replacement) from the first
``trunc_steps + 1`` of the sampling grid, the same for the whole iteration. ``clip_dsm``: where the ratio
``exp(ℓ_old - ℓ_θ)`` to an EMA of the policy leaves ``[1 - c, 1 + c]`` in the advantage's direction, that point's
``ℓ_θ`` carries no gradient. The EMA (``d = min(0.001·steps, 0.3)``, after every optimizer step) also samples
the rollouts after ``switch_ema_ref`` optimizer steps, and with ``use_ema_ref`` replaces the base as the DPO
reference. ``v_ref`` is the LoRA-off base (with CFG at ``kl_cfg`` > 1, the code's mode 2a). Rollouts may use
CFG (``train.guidance``) while training forwards do not (``train.cfg: false``), as the code: the loss compares
samples within a group.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from ..seeds import derive_seed
from ..training.shadow import ShadowWeights, ramp_decay
from ..typed import bounded
from . import register_method
from .base import require
from .flow_matching import FlowMatchingMethod, FlowMatchingOptions, group_scores


@dataclass
class DGPOOptions(FlowMatchingOptions):
    group_size: int = bounded(16, min=2, doc="ODE samples per prompt (one group; the paper: 24 is better)")
    fm_draws: int = bounded(4, min=1, doc="grid levels trained per iteration, shared by every sample")
    trunc_steps: int = bounded(4, min=0, doc="levels are drawn from grid indices [0, trunc_steps] (GenEval 4, "
                               "else 6: the high-noise end)")
    solver: Literal["euler", "dpm_solver"] = bounded("dpm_solver", doc="DPM-Solver++ 2M, as the code")
    shared_noise: bool = bounded(True, doc="a group's members share the noise at each level")
    beta_dpo: float = bounded(100.0, min=0.0, doc="beta of the group DPO margin (PickScore: 10)")
    kl_weight: float = bounded(0.02, min=0.0, doc="weight of mean (v - v_ref)^2 to the LoRA-off base "
                               "(PickScore: 0.001)")
    adv_clip: float = bounded(5.0, min=0.0, doc="advantages clipped to +-adv_clip")
    clip_dsm: bool = bounded(True, doc="no gradient where the ratio to the EMA leaves 1 +- clip_range")
    clip_range: float = bounded(0.01, min=0.0, doc="the band around 1 of clip_dsm (its c)")
    use_ema_ref: bool = bounded(False, doc="the EMA instead of the base as the DPO reference")
    kl_cfg: float = bounded(1.0, min=1.0, max=100.0, doc="CFG scale of the LoRA-off reference (> 1: the base with "
                            "CFG, the code's CFG-free mode 2a with 4.5; 1: without)")
    switch_ema_ref: int = bounded(500, min=0, doc="optimizer steps after which the EMA samples the rollouts "
                                  "(OCR, PickScore: 200)")
    ema_decay_rate: float = bounded(0.001, min=0.0, doc="EMA decay d = min(rate * steps, max) per optimizer step")
    ema_decay_max: float = bounded(0.3, min=0.0, max=1.0, doc="the EMA reference's largest decay")
    std: Literal["global", "group"] = bounded("group", doc="advantage std per group (GenEval) or over the batch")
    std_eps: float = bounded(1e-4, min=0.0, doc="added to the advantage std")


@register_method
class DGPO(FlowMatchingMethod):
    name = "dgpo"
    title = "DGPO"
    paper = "arXiv 2510.08425"
    Options = DGPOOptions
    skips_failed_samples = True  # a skipped sample weighs 0 in the loss
    whole_prompts = "a group's weight sums over all of its samples"
    guided_rollouts = True

    @classmethod
    def check(cls, options, train, modifiers) -> None:
        super().check(options, train, modifiers)
        require(options.trunc_steps < train.steps, f"dgpo.trunc_steps: {options.trunc_steps} must be below "
                f"train.steps ({train.steps})")
        require(options.fm_draws <= options.trunc_steps + 1, f"dgpo.fm_draws: {options.fm_draws} distinct levels "
                f"need trunc_steps >= {options.fm_draws - 1} (it is {options.trunc_steps})")
        require(train.lora_rank > 0, "method dgpo compares with the LoRA-off base: it needs train.lora_rank > 0")

    @property
    def negative_branch(self) -> bool:
        return self.options.kl_cfg > 1  # the reference's CFG needs the negative prompt even for unguided rollouts

    def setup(self, trainer) -> None:
        self.ema = ShadowWeights(trainer.params)

    def sampling_weights(self, trainer) -> contextlib.AbstractContextManager:
        steps = trainer.iteration * self.train.updates_per_iteration
        return self.ema.swapped_in() if steps > self.options.switch_ema_ref else contextlib.nullcontext()

    def update(self, trainer, batch) -> dict[str, float]:
        o = self.options
        adv, valid = group_scores(trainer, batch, o.group_size, o.std, o.std_eps)
        points = self.group_points(trainer, batch)
        adv_p = adv.clamp(-o.adv_clip, o.adv_clip)[points["owner"]]  # a skipped sample's advantage is 0
        v_ref = trainer.point_velocities(batch, points, reference=True, guidance=o.kl_cfg if o.kl_cfg > 1 else None)
        v_old = trainer.point_velocities(batch, points, self.ema.swapped_in()) if o.clip_dsm or o.use_ema_ref \
            else None
        loss_now = fm_loss(trainer.point_velocities(batch, points), points["target"])
        loss_ref = fm_loss(v_old if o.use_ema_ref else v_ref, points["target"])
        weight = group_weights(adv_p, loss_now, loss_ref, points["key"], o.beta_dpo, o.group_size)
        loss_old = fm_loss(v_old, points["target"]) if o.clip_dsm else None

        def minibatch_loss(idx: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, dict]:
            dsm, stats = fm_loss(v, points["target"][idx]), {}
            if loss_old is not None:
                clipped = dsm_clipped(dsm.detach(), loss_old[idx], adv_p[idx], o.clip_range)
                dsm = torch.where(clipped, dsm.detach(), dsm)
                stats["clip_fraction"] = clipped.float().mean()
            stats["policy_loss"] = (weight[idx] * adv_p[idx] * dsm).mean()
            stats["kl"] = (v - v_ref[idx]).pow(2).flatten(1).mean(1).mean()
            return stats["policy_loss"] + o.kl_weight * stats["kl"], stats

        def ema_step(u: int) -> None:  # after every optimizer step, with the steps before it (as the code)
            steps_before = batch.iteration * self.train.updates_per_iteration + u
            self.ema.blend(ramp_decay(steps_before, o.ema_decay_rate, o.ema_decay_max))

        stats = trainer.train_on_points(batch, points, minibatch_loss, ema_step)
        return {**stats, "group_weight/mean": weight.mean().item()}

    def group_points(self, trainer, batch) -> dict[str, torch.Tensor]:
        """``fm_draws`` points per sample, draw-major: draw m of every sample at grid index ``t_m`` (the same for
        the whole iteration), noise shared by the group at each draw (seeded by group and draw, so the points do
        not depend on the process count); ``key`` numbers the (group, draw) pairs."""
        o, x0 = self.options, batch.leaves
        grid = trainer.gen.sigmas(self.train.steps)[:-1].float()
        g = torch.Generator().manual_seed(derive_seed(self.train.seed, batch.iteration, 7))
        levels = grid[torch.randperm(o.trunc_steps + 1, generator=g)[:o.fm_draws]].to(x0.device)
        groups = (batch.leaf_ids // o.group_size).tolist()
        noises = []
        for m in range(o.fm_draws):
            for sample, group in zip(batch.leaf_ids.tolist(), groups):
                who = group if o.shared_noise else -1 - sample
                gen = torch.Generator().manual_seed(derive_seed(self.train.seed, batch.iteration, 11, m, who))
                noises.append(torch.randn(x0.shape[1:], generator=gen))
        n = x0.shape[0]
        eps = torch.stack(noises).to(x0.device)
        sigma = levels.repeat_interleave(n)
        owner = torch.arange(n, device=x0.device).repeat(o.fm_draws)
        s = sigma.view(-1, *([1] * (x0.ndim - 1)))
        key = torch.tensor(groups, device=x0.device).repeat(o.fm_draws) * o.fm_draws + \
            torch.arange(o.fm_draws, device=x0.device).repeat_interleave(n)
        return {"x": (1 - s) * x0[owner] + s * eps, "sigma": sigma, "target": eps - x0[owner], "owner": owner,
                "key": key}

    def extra_state(self, trainer) -> tuple[dict, dict]:
        return self.ema.state("ema_ref."), {}

    def load_extra_state(self, trainer, weights: dict, optimizers: dict) -> None:
        self.ema.load(weights, "ema_ref.")


# ---------------------------------------------------------------------------- the maths


def fm_loss(v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per point ``mean (v - u)²``."""
    return (v.float() - target.float()).pow(2).flatten(1).mean(1)


def group_weights(adv: torch.Tensor, loss: torch.Tensor, loss_ref: torch.Tensor, key: torch.Tensor,
                  beta_dpo: float, group_size: int) -> torch.Tensor:
    """Per point ``σ(s_k)``, ``s_k = Σ_{i: key_i = k} A_i·β_dpo·(ℓ_i - ℓ_ref,i)/G`` (no gradient)."""
    term = (adv * beta_dpo * (loss - loss_ref) / group_size).detach()
    sums = torch.zeros(int(key.max()) + 1, device=term.device, dtype=term.dtype).index_add(0, key, term)
    return torch.sigmoid(sums)[key]


def dsm_clipped(loss: torch.Tensor, loss_old: torch.Tensor, adv: torch.Tensor, clip: float) -> torch.Tensor:
    """Where ``ρ = exp(ℓ_old - ℓ)`` is past ``1 + c`` with ``A > 0`` or below ``1 - c`` with ``A ≤ 0``."""
    ratio = torch.exp(loss_old - loss)
    return torch.where(adv > 0, ratio > 1 + clip, ratio < 1 - clip)
