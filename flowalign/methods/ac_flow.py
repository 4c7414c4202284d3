"""AC-Flow: a critic of intermediate states weighting the flow-matching loss (paper-approximate parts labelled).

- **reward shaping**: ``r̃ = (r - mean)/(std + eps)`` over the batch or per prompt group, optionally bounded
  (``tanh`` or clipped to ±c; paper-approximate);
- **critic** ``V_φ(x_σ, σ, c)``: a small CNN over the latent grid plus an MLP head fed with a σ embedding and
  the pooled text embedding; it regresses ``r̃`` of the clean sample behind each noisy state;
- **advantage** ``A = clip(r̃ - V_φ(x_σ, σ, c), ±ε_A)`` per (sample, σ): at high noise the critic knows little
  and the advantage is the reward against the prompt's typical one; near the data it credits little;
- **actor**: ``E[w(A)·||v_θ(x_σ) - (ε - x0)||²] + α·E||v_θ(x_σ) - v_ref(x_σ)||²`` with ``w = exp(β·A)``
  (optionally divided by its batch mean); the second term bounds W2 to the frozen base (the LoRA-off model);
- **warm-up**: the first iterations train the critic only.

ORW-CFM-W2 (``orw_cfm_w2.py``) is the special case without a critic: ``A = r`` (raw), no clip, ``w = exp(β·r)``.
Samples come from the CFG-guided ODE, so with ``train.cfg`` the guided velocity is fitted (both branches carry
the LoRA); fitting the conditional one to guided samples compounds the guidance every iteration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..seeds import derive_seed
from ..typed import bounded
from . import register_method
from .base import require
from .flow_matching import FlowMatchingMethod, FlowMatchingOptions


@dataclass
class ACFlowOptions(FlowMatchingOptions):
    critic_width: int = bounded(32, min=4, doc="channels of the critic network")
    critic_lr: float = bounded(1e-3, min=0.0, doc="the critic's AdamW learning rate")
    critic_updates: int = bounded(2, min=1, doc="passes over the iteration's points per critic update")
    critic_warmup: int = bounded(3, min=0, doc="iterations that train the critic only")
    shape_per_group: bool = bounded(False, doc="reward shaping per prompt group instead of per batch")
    reward_bound: Literal["none", "tanh", "clip"] = bounded("none", doc="shaped-reward bound (paper-approximate)")
    reward_bound_value: float = bounded(3.0, min=0.0, doc="the bound of reward_bound (tanh scale or clip value)")
    adv_clip: float = bounded(2.0, min=0.0, doc="advantages clipped to +-adv_clip (0: off)")
    weight_beta: float = bounded(0.5, min=0.0, doc="weights exp(weight_beta * A)")
    weight_norm: bool = bounded(True, doc="divide the weights by their batch mean")
    w2_weight: float = bounded(1.0, min=0.0, doc="alpha of the W2 bound ||v - v_ref||^2 to the LoRA-off base")


@register_method
class ACFlow(FlowMatchingMethod):
    name = "ac_flow"
    title = "AC-Flow"
    paper = "arXiv 2510.18072"
    Options = ACFlowOptions
    uses_critic = True

    @classmethod
    def check(cls, options, train, modifiers) -> None:
        super().check(options, train, modifiers)
        require(train.lora_rank > 0 or options.w2_weight == 0, f"{cls.name}.w2_weight bounds the distance to the "
                "LoRA-off base: it needs train.lora_rank > 0 (or w2_weight 0)")

    def setup(self, trainer) -> None:
        self.critic = None
        if not self.uses_critic:
            return
        text_dim = pooled_text(trainer.gen.encode([""], negative_prompt=None).positive).shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.train.seed + 1)
            critic = Critic(tuple(trainer.gen.latent_shape), text_dim, self.options.critic_width)
        optimizer = torch.optim.AdamW(critic.parameters(), lr=self.options.critic_lr, weight_decay=0.0)
        self.critic, self.critic_optimizer = trainer.acc.prepare(critic.to(trainer.acc.device), optimizer)

    def update(self, trainer, batch) -> dict[str, float]:
        o = self.options
        position = trainer.gathered(batch.rewards, batch)[1]
        groups = torch.arange(len(batch.all_rewards), device=batch.all_rewards.device) // o.group_size
        if self.critic is not None:
            shaped = shape_rewards(batch.all_rewards, groups if o.shape_per_group else None, o.reward_bound,
                                   o.reward_bound_value)[position]
        else:
            shaped = batch.rewards  # ORW-CFM-W2: w = exp(β·r) on the raw reward
        rng = torch.Generator().manual_seed(derive_seed(self.train.seed, batch.iteration, 13))
        points = trainer.flow_points(batch, o.fm_draws)
        text = pooled_text(batch.cond.select(batch.leaf_row).positive)[points["owner"]]
        targets = shaped[points["owner"]].float()
        stats = {}
        if self.critic is not None:
            stats.update(self.train_critic(trainer, points, text, targets, rng))
        if self.critic is None or batch.iteration >= o.critic_warmup:
            stats.update(self.train_actor(trainer, batch, points, text, targets, rng))
        return stats

    def train_critic(self, trainer, points: dict, text: torch.Tensor, targets: torch.Tensor,
                     rng: torch.Generator) -> dict[str, float]:
        """Regress ``V(x_σ, σ, c)`` on the shaped rewards; the explained variance is measured first, on
        points the critic has not seen."""
        with torch.no_grad():
            before = self.critic(points["x"], points["sigma"], text)
        losses = []
        for _ in range(self.options.critic_updates):
            for idx in torch.randperm(len(targets), generator=rng).split(self.train.train_batch):
                idx = idx.to(targets.device)
                loss = (self.critic(points["x"][idx], points["sigma"][idx], text[idx]) - targets[idx]).pow(2).mean()
                trainer.acc.backward(loss)
                self.critic_optimizer.step()
                self.critic_optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
        return {"critic/explained_variance": explained_variance(before, targets),
                "critic/loss": torch.stack(losses).mean().item()}

    def train_actor(self, trainer, batch, points: dict, text: torch.Tensor, targets: torch.Tensor,
                    rng: torch.Generator) -> dict[str, float]:
        """Advantage-weighted flow matching plus the W2 bound to the LoRA-off base."""
        o = self.options
        with torch.no_grad():
            values = self.critic(points["x"], points["sigma"], text) if self.critic is not None else None
        adv = clipped_advantages(targets, values, o.adv_clip if self.critic is not None else 0.0)
        everyone = trainer.acc.gather(adv.contiguous()) if o.weight_norm else None
        weights = advantage_weights(adv, o.weight_beta, o.weight_norm, everyone)
        stats: dict[str, list[float]] = {}
        for chunk in torch.randperm(len(targets), generator=rng).chunk(self.train.updates_per_iteration):
            for start in range(0, len(chunk), self.train.train_batch):
                idx = chunk[start:start + self.train.train_batch].to(targets.device)
                cond = batch.cond.select(batch.leaf_row[points["owner"][idx]])
                v = trainer.policy_velocity(points["x"][idx], points["sigma"][idx], cond)
                fm = (weights[idx] * per_sample_mse(v, points["target"][idx])).mean()
                loss = fm
                if o.w2_weight > 0:
                    v_ref = trainer.policy_velocity(points["x"][idx], points["sigma"][idx], cond, reference=True)
                    w2 = per_sample_mse(v, v_ref).mean()
                    loss = loss + o.w2_weight * w2
                    stats.setdefault("w2", []).append(w2.item())
                trainer.acc.backward(loss * len(idx) / len(chunk))
                stats.setdefault("fm_loss", []).append(fm.item())
            grad_norm = trainer.optimizer_step()
            if grad_norm is not None:
                stats.setdefault("grad_norm", []).append(float(grad_norm))
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out["advantage/abs_mean"] = adv.abs().mean().item()
        return out

    def extra_state(self, trainer) -> tuple[dict, dict]:
        if self.critic is None:
            return {}, {}
        critic = trainer.acc.unwrap_model(self.critic)
        return ({f"critic.{k}": v.detach().clone() for k, v in critic.state_dict().items()},
                {"critic": self.critic_optimizer.state_dict()})

    def load_extra_state(self, trainer, weights: dict, optimizers: dict) -> None:
        if self.critic is None:
            return
        critic = trainer.acc.unwrap_model(self.critic)
        critic.load_state_dict({k.removeprefix("critic."): v.to(trainer.acc.device) for k, v in weights.items()})
        self.critic_optimizer.load_state_dict(optimizers["critic"])


# ---------------------------------------------------------------------------- the maths


def pooled_text(embeds: dict[str, torch.Tensor]) -> torch.Tensor:
    """One vector per prompt from an adapter's conditioning: its pooled embedding, else the token mean."""
    for name in ("pooled", "pooled_prompt_embeds", "text_embeds"):
        if name in embeds:
            return embeds[name].float().flatten(1)
    tokens = next(v for v in embeds.values() if v.ndim == 3)
    return tokens.float().mean(dim=1)


def sigma_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of ``1000·σ`` (the transformers' timestep scale)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=sigma.device) / half)
    angles = 1000 * sigma.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Critic(nn.Module):
    """``V(x_σ, σ, c)`` on any latent layout: leading dims fold into channels (video ``[C,F,H,W]`` ->
    ``[C·F,H,W]``), a 1-D latent (audio ``[C,L]``) becomes ``[C,1,L]``."""

    def __init__(self, latent_shape: tuple[int, ...], text_dim: int, width: int = 32):
        super().__init__()
        channels = latent_shape[0] if len(latent_shape) == 2 else math.prod(latent_shape[:-2])
        self.width = width
        self.trunk = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU())
        self.text = nn.Linear(text_dim, width)
        self.head = nn.Sequential(nn.LayerNorm(4 * width), nn.Linear(4 * width, 2 * width), nn.SiLU(),
                                  nn.Linear(2 * width, 1))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x.unsqueeze(-2) if x.ndim == 3 else x.flatten(1, -3)
        features = torch.cat([self.trunk(x), self.time(sigma_embedding(sigma, self.width)), self.text(text.float())], 1)
        return self.head(features).squeeze(1)


def shape_rewards(rewards: torch.Tensor, groups: torch.Tensor | None = None, bound: str = "none",
                  bound_value: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """``(r - mean)/(std + eps)`` over the batch (``groups`` None) or within each group; then ``none``,
    ``tanh`` (``c·tanh(r̃/c)``) or ``clip`` (to ±c)."""
    if groups is None:
        shaped = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)
    else:
        shaped = torch.empty_like(rewards)
        for g in groups.unique():
            rows = groups == g
            shaped[rows] = (rewards[rows] - rewards[rows].mean()) / (rewards[rows].std(unbiased=False) + eps)
    if bound == "tanh":
        return bound_value * torch.tanh(shaped / bound_value)
    if bound == "clip":
        return shaped.clamp(-bound_value, bound_value)
    if bound != "none":
        raise ValueError(f"reward bound: expected none, tanh or clip, got {bound!r}")
    return shaped


def clipped_advantages(shaped: torch.Tensor, values: torch.Tensor | None, clip: float) -> torch.Tensor:
    """``clip(r̃ - V, ±clip)`` (no critic: ``r̃`` itself; ``clip`` 0: unclipped)."""
    adv = shaped if values is None else shaped - values.detach()
    return adv.clamp(-clip, clip) if clip > 0 else adv


def advantage_weights(adv: torch.Tensor, beta: float, normalize: bool,
                      everyone: torch.Tensor | None = None) -> torch.Tensor:
    """``exp(β·A)``, divided by its mean when ``normalize`` (keeps the loss scale fixed): the mean over
    ``everyone``, every process's advantages gathered, so the weights do not depend on how points are spread."""
    if not normalize:
        return torch.exp(beta * adv)
    everyone = adv if everyone is None else everyone
    top = everyone.max()
    return torch.exp(beta * (adv - top)) / torch.exp(beta * (everyone - top)).mean()


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def explained_variance(values: torch.Tensor, targets: torch.Tensor) -> float:
    """``1 - Var(target - V)/Var(target)``: 1 is a perfect critic, 0 one that predicts the mean."""
    var = targets.var(unbiased=False)
    return float(1 - (targets - values).var(unbiased=False) / var) if var > 0 else 0.0
