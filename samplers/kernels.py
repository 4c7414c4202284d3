"""One step kernel for every sampler of the GRPO family, with exact Gaussian log-probs in fp32.

Flow convention: ``x_σ = (1-σ)·x0 + σ·ε``, ``v ≈ ε - x0``, so ``x̂0 = x - σ·v`` and ``ε̂ = x + (1-σ)·v``.
Two step forms cover all noise schedules (docs/samplers.md):

- **SDE form** (``zero``, ``flow_grpo(a)``, ``dance(η)``): ``μ = x + Δσ·(v + g²/(2σ)·ε̂)``, std ``g·sqrt(|Δσ|)``;
- **coefficients-preserving form** (``cps(a)``, ``ddim(η)``): ``μ = (1-σ')·x̂0 + sqrt(σ'² - s²)·ε̂``, std ``s``.

With no noise both reduce to the Euler step ``x + Δσ·v``. DDIM-η is written in flow coordinates: a DDPM
latent ``sqrt(ᾱ)x0 + sqrt(1-ᾱ)ε`` divided by ``sqrt(ᾱ) + sqrt(1-ᾱ)`` is the flow state with
``σ = sqrt(1-ᾱ)/(sqrt(ᾱ)+sqrt(1-ᾱ))``, so an ε- or v-prediction adapter that converts its state and output
to this convention gets the DDIM-η step (its log-prob differs from the DDPM-space one by a constant
that cancels in every ratio).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

NoiseKind = Literal["zero", "flow_grpo", "dance", "cps", "ddim"]
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class NoiseSchedule:
    """Which noise a step injects: ``kind`` and its level (``a`` for flow_grpo / cps, ``η`` for dance / ddim).

    ``cps_logp="flow_grpo"`` reproduces Flow-GRPO's CPS log-prob ``-mean((x'-μ)²)`` (constants and the
    variance dropped); the default is the exact Gaussian log-prob like every other schedule.
    """

    kind: NoiseKind = "zero"
    level: float = 0.0
    cps_logp: Literal["gaussian", "flow_grpo"] = "gaussian"

    @property
    def coefficient_preserving(self) -> bool:
        return self.kind in ("cps", "ddim")

    def std(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        """The standard deviation of ``x'`` given ``x`` (0 for the ODE)."""
        dt = (sigma - sigma_next).abs()
        if self.kind == "zero" or self.level == 0:
            return torch.zeros_like(sigma)
        if self.kind == "flow_grpo":
            return self.diffusion(sigma, sigma_next) * dt.sqrt()
        if self.kind == "dance":
            return torch.full_like(sigma, self.level) * dt.sqrt()
        if self.kind == "cps":
            return sigma_next * math.sin(self.level * math.pi / 2)
        if self.kind == "ddim":
            return _ddim_std(sigma, sigma_next, self.level)
        raise ValueError(f"noise schedule kind {self.kind!r}: expected zero, flow_grpo, dance, cps or ddim")

    def diffusion(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        """The SDE diffusion coefficient g (std per sqrt(|Δσ|)); Flow-GRPO's a·sqrt(σ/(1-σ)) uses
        σ_next in the denominator at σ = 1, as the anchor (which divides by ``sigmas[1]`` there) does."""
        if self.kind == "flow_grpo":
            denom_sigma = torch.where(sigma >= 1, sigma_next, sigma)
            return self.level * (sigma / (1 - denom_sigma)).sqrt()
        if self.kind == "dance":
            return torch.full_like(sigma, self.level)
        dt = (sigma - sigma_next).abs().clamp_min(1e-12)
        return self.std(sigma, sigma_next) / dt.sqrt()


def zero() -> NoiseSchedule:
    return NoiseSchedule("zero", 0.0)


def flow_grpo(a: float = 0.7) -> NoiseSchedule:
    return NoiseSchedule("flow_grpo", a)


def dance(eta: float = 0.3) -> NoiseSchedule:
    return NoiseSchedule("dance", eta)


def cps(a: float = 0.8, logp: Literal["gaussian", "flow_grpo"] = "gaussian") -> NoiseSchedule:
    return NoiseSchedule("cps", a, logp)


def ddim(eta: float = 1.0) -> NoiseSchedule:
    return NoiseSchedule("ddim", eta)


def _ddim_std(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> torch.Tensor:
    """DDIM's ``η·sqrt((1-ᾱ')/(1-ᾱ))·sqrt(1-ᾱ/ᾱ')`` mapped to flow coordinates (times ``1/(sqrt(ᾱ')+sqrt(1-ᾱ'))``)."""
    def alpha_bar(s):
        return (1 - s) ** 2 / ((1 - s) ** 2 + s ** 2)

    ab, ab_next = alpha_bar(sigma), alpha_bar(sigma_next)
    var = (1 - ab_next) / (1 - ab).clamp_min(1e-12) * (1 - ab / ab_next.clamp_min(1e-12))
    scale = ((1 - sigma_next) ** 2 + sigma_next ** 2).sqrt()  # 1 / (sqrt(ᾱ') + sqrt(1-ᾱ'))
    return eta * var.clamp_min(0).sqrt() * scale


class StepOutput(NamedTuple):
    x_next: torch.Tensor
    logp: torch.Tensor  # [B], fp32; 0 where the step is deterministic
    mean: torch.Tensor  # fp32
    std: torch.Tensor  # [B], fp32


def _per_sample(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """σ as a float32 ``[B]`` tensor (a scalar is broadcast to the batch)."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value.expand(like.shape[0]) if value.ndim == 0 else value.float()


def step_mean(v: torch.Tensor, x: torch.Tensor, sigma, sigma_next, schedule: NoiseSchedule,
              noise_scale: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and std (``[B]``) of ``x'`` given ``x`` and the velocity ``v``, in fp32.

    ``noise_scale`` (per sample) multiplies the schedule's g (and so its std): 0 makes that sample's step
    an ODE step, values above 1 the rising per-depth noise of tree rollouts."""
    v, x = v.float(), x.float()
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    scale = _per_sample(noise_scale, x)
    std = schedule.std(sigma, sigma_next) * scale
    shape = (-1,) + (1,) * (x.ndim - 1)
    s, s_next, std_b = sigma.view(shape), sigma_next.view(shape), std.view(shape)
    eps_hat = x + (1 - s) * v
    if schedule.coefficient_preserving:
        x0_hat = x - s * v
        mean = (1 - s_next) * x0_hat + (s_next ** 2 - std_b ** 2).clamp_min(0).sqrt() * eps_hat
    else:
        g = schedule.diffusion(sigma, sigma_next) * scale if schedule.kind != "zero" else torch.zeros_like(sigma)
        g = g.view(shape)
        mean = x + (s_next - s) * (v + g ** 2 / (2 * s) * eps_hat)
    return mean, std


def gaussian_logp(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                  reduce: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """log N(x_next; mean, std²) reduced over all non-batch dims (mean, as the anchors; or sum); 0 where std = 0."""
    x_next = x_next.float()
    shape = (-1,) + (1,) * (x_next.ndim - 1)
    safe = torch.where(std > 0, std, torch.ones_like(std)).view(shape)
    elem = -((x_next - mean) ** 2) / (2 * safe ** 2) - safe.log() - LOG_SQRT_2PI
    dims = tuple(range(1, x_next.ndim))
    logp = elem.mean(dim=dims) if reduce == "mean" else elem.sum(dim=dims)
    return torch.where(std > 0, logp, torch.zeros_like(logp))


def step(v: torch.Tensor, x: torch.Tensor, sigma, sigma_next, noise: torch.Tensor | None = None,
         schedule: NoiseSchedule = NoiseSchedule(), prev_sample: torch.Tensor | None = None,
         reduce: Literal["mean", "sum"] = "mean", noise_scale: torch.Tensor | float = 1.0) -> StepOutput:
    """One step from σ to σ_next. Sampling: ``x' = μ + std·noise``. Training: pass the stored ``prev_sample``
    (the ``x'`` of the rollout) and it is re-scored under the current ``v``. Everything is computed in fp32."""
    mean, std = step_mean(v, x, sigma, sigma_next, schedule, noise_scale)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn_like(mean)
        x_next = mean + std.view((-1,) + (1,) * (mean.ndim - 1)) * noise.float()
    else:
        x_next = prev_sample.float()
    return StepOutput(x_next, step_logp(x_next, mean, std, schedule, reduce), mean, std)


def step_logp(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, schedule: NoiseSchedule,
              reduce: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """The step's log-prob: exact Gaussian, or Flow-GRPO's simplified CPS form when the schedule asks for it."""
    if schedule.kind == "cps" and schedule.cps_logp == "flow_grpo":
        logp = -((x_next.float() - mean) ** 2).mean(dim=tuple(range(1, mean.ndim)))
        return torch.where(std > 0, logp, torch.zeros_like(logp))
    return gaussian_logp(x_next, mean, std, reduce)


def kl_to_reference(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, sigma, sigma_next,
                    denominator: Literal["flow_grpo", "gaussian"] = "flow_grpo",
                    coefficient_preserving: bool = False) -> torch.Tensor:
    """Per-sample KL proxy between the current and reference step means, ``mean((μ-μ_ref)²)/(2·d²)``.

    ``flow_grpo``: Flow-GRPO's ``std_dev_t``: for its SDE the std without sqrt(|Δσ|), g (so late steps weigh
    more); under CPS (``coefficient_preserving``) the step's actual std, which is what its CPS step returns;
    ``gaussian``: d = the step's actual std, the exact KL of the two step Gaussians per dimension (Pref-GRPO).
    """
    sq = ((mean.float() - ref_mean.float()) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    if denominator == "gaussian" or coefficient_preserving:
        d = std
    else:
        sigma, sigma_next = _per_sample(sigma, mean), _per_sample(sigma_next, mean)
        d = std / (sigma - sigma_next).abs().clamp_min(1e-12).sqrt()
    d = torch.where(d > 0, d, torch.ones_like(d))
    return sq / (2 * d ** 2)
