"""ReNO: reward-based noise optimisation (Eyring, Karthik et al., NeurIPS 2024).

The initial noise ε of a frozen generator is optimised through the whole (few-step) ODE sampler,
decoder and differentiable rewards:

    x = ODE(ε) ; L = -Σ_i λ_i·s_i(decode(x)) + λ_reg·(½||ε||² - (d-1)·log||ε||)      (regulariser in fp32)

with SGD + Nesterov momentum (lr 5, momentum 0.9), the gradient norm of ε clipped to 0.1, 50
iterations, and the best iterate *by reward* (the regulariser left out of the selection) returned, not
the last. The regulariser is the negative log-likelihood of ||ε|| under the χ_d distribution, so ε
stays on the Gaussian shell (its minimum is at ||ε|| = sqrt(d-1)).

Rows of a batch are independent problems (one prompt and seed each): the clip is applied per row, so a
batch of B rows is exactly B single runs done at once.

Compute is counted in model evaluations (NFE): one forward pass of the velocity model per ODE step and
row (CFG's two branches are batched into that one pass) and one backward pass through it counted as one
more NFE ("backward = 1 NFE"; ``nfe_backward`` is kept apart so another convention can be applied).
Recomputed forwards of gradient checkpointing are counted apart too (``nfe_recompute``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import FlowalignError
from ..generators.base import Conditioning, Generator
from ..typed import bounded
from .noise import (
    IterationState,
    NoiseRun,
    OptimizeResult,
    Progress,
    finish_render,
    require_differentiable,
    reward_parts,
)

#: ReNO's reward weights (arXiv 2406.04312, ``arguments.py``), in this toolkit's reward names. Each
#: ReNO loss is "constant - score", so the weights carry over to the scores: HPSv2.1 cos ×5, ImageReward
#: ×1, CLIPScore (100·cos) ×0.01, PickScore (≈100·cos) ×0.05.
RENO_WEIGHTS = {"hpsv2.1": 5.0, "imagereward": 1.0, "clipscore": 0.01, "pickscore": 0.05}


@dataclass
class ReNOConfig:
    """ReNO's options; the defaults are the published ones."""

    iterations: int = bounded(50, min=1, max=100_000)
    lr: float = bounded(5.0, min=1e-12, doc="learning rate of the noise")
    optimizer: Literal["sgd", "adam"] = bounded("sgd", doc="sgd (Nesterov) or adam (eps 1e-2, as ReNO's code)")
    momentum: float = bounded(0.9, min=0.0, max=1.0)
    grad_clip: float = bounded(0.1, doc="max gradient norm per row (<= 0: off)")
    reg_weight: float = bounded(0.01, min=0.0, doc="lambda of the chi-norm regulariser (0: off)")
    steps: int | None = bounded(None, min=1, max=1000, doc="ODE steps while optimising (model default if unset)")
    render_steps: int | None = bounded(None, min=1, max=1000, doc="steps to render the best noise with at the end")
    guidance: float | None = bounded(None, min=0.0, max=100.0, doc="CFG scale (model default if unset)")
    negative_prompt: str = ""
    checkpointing: bool = bounded(False, doc="torch.utils.checkpoint around each velocity call, the decoder, "
                                  "each reward (less memory)")
    truncate: int | None = bounded(None, min=1, doc="backpropagate through the last K ODE steps only")
    keep_images: bool = bounded(True, doc="keep every iteration's images (for the app / the CLI)")
    # CARINOX-style options
    multiclip: bool = bounded(False, doc="clip each reward's gradient separately before summing")
    reg_per_reward: bool = bounded(True, doc="with multiclip: the regulariser inside each reward's term (CARINOX)")

    def check(self) -> None:
        """The same bounds for library callers (a config file is checked when it is read)."""
        if self.optimizer not in ("sgd", "adam"):
            raise FlowalignError(f"optimizer: expected 'sgd' or 'adam', got '{self.optimizer}'")
        for name in ("iterations", "steps", "render_steps", "truncate"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise FlowalignError(f"{name}: expected an integer >= 1, got {value}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FlowalignError(f"lr: expected a positive number, got {self.lr}")


def chi_norm_nll(noise: torch.Tensor) -> torch.Tensor:
    """Per row, -log of the χ_d density of ||ε|| up to a constant: ½r² - (d-1)·log r, in fp32."""
    flat = noise.float().flatten(1)
    r = flat.norm(dim=1)
    return 0.5 * r ** 2 - (flat.shape[1] - 1) * torch.log(r)


def _clip_rows(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Each row's gradient scaled to norm <= ``max_norm`` (``clip_grad_norm_`` per independent problem)."""
    if max_norm <= 0:
        return grad
    norms = grad.flatten(1).norm(dim=1).view(-1, *[1] * (grad.ndim - 1))
    return grad * (max_norm / (norms + 1e-6)).clamp(max=1.0)


def sample_with_grad(gen: Generator, noise: torch.Tensor, cond: Conditioning, sigmas: torch.Tensor,
                     guidance: float, checkpointing: bool = False, truncate: int | None = None) -> torch.Tensor:
    """The Euler ODE sample from ``noise`` with gradients to ``noise``.

    ``truncate=K``: the first T-K velocities are computed without a graph and enter as constants, so
    the gradient reaches ε through the residual path x_{k+1} = x_k + Δσ·v_k only (∂x_{T-K}/∂ε = I)."""
    steps = len(sigmas) - 1
    first_grad = 0 if truncate is None else max(0, steps - truncate)

    def vel(x, s):
        return gen.velocity(x, s, cond, guidance)

    x = gen.initial_state(noise, sigmas[0])  # ε/v-prediction adapters start from a rescaled ε
    for k, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if k < first_grad:
            with torch.no_grad():
                v = vel(x, sigma)
        elif checkpointing:
            v = checkpoint(vel, x, sigma, use_reentrant=False)
        else:
            v = vel(x, sigma)
        x = x + (sigma_next - sigma) * v
    return x


def grad_steps(steps: int, truncate: int | None) -> int:
    return steps if truncate is None else min(steps, truncate)


def run_noise_optimization(gen: Generator, cond: Conditioning, noise: torch.Tensor, reward,
                           config: ReNOConfig, weights: torch.Tensor | None = None,
                           selection_weights: torch.Tensor | None = None, metadata: list[dict] | None = None,
                           matched_iterations: int | None = None, method: str = "reno",
                           ) -> Iterator[IterationState | NoiseRun]:
    """Optimise ``noise`` ([N, *latent], one row per prompt of ``cond``); yields an ``IterationState`` per
    iteration and the ``NoiseRun`` last.

    ``weights`` [N, R]: each reward's weight in the loss per row (default: the composite's weights);
    ``selection_weights`` [N, R]: the weights of the reward that picks the best iterate (default: ``weights``).
    """
    config.check()
    parts, part_weights = reward_parts(reward)
    require_differentiable(parts, method)
    names = list(parts)
    n = noise.shape[0]
    if weights is None:
        weights = torch.tensor([[part_weights[k] for k in names]] * n, dtype=torch.float32)
    weights = weights.to(noise.device)
    selection_weights = weights if selection_weights is None else selection_weights.to(noise.device)
    steps = config.steps or gen.default_steps
    guidance = gen.default_guidance if config.guidance is None else config.guidance
    sigmas = gen.sigmas(steps)
    prompts = list(cond.prompts)
    eps = torch.nn.Parameter(noise.detach().clone().float())
    if config.optimizer == "sgd":
        opt = torch.optim.SGD([eps], lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    else:
        opt = torch.optim.Adam([eps], lr=config.lr, eps=1e-2)
    run = NoiseRun(best_noise=eps.detach().clone(), best_images=None, best_rewards=torch.full((n,), -math.inf),
                   best_parts={}, best_iteration=torch.zeros(n, dtype=torch.long))
    back_per_iter = grad_steps(steps, config.truncate)

    def score_parts(images):
        out = {}
        for name, r in parts.items():
            if config.checkpointing:
                out[name] = checkpoint(lambda im, r=r: r.score(im, prompts, metadata), images, use_reentrant=False)
            else:
                out[name] = r.score(images, prompts, metadata)
        return out

    with torch.enable_grad():
        for it in range(config.iterations):
            opt.zero_grad(set_to_none=True)
            x = sample_with_grad(gen, eps, cond, sigmas, guidance, config.checkpointing, config.truncate)
            images = checkpoint(gen.decode, x, use_reentrant=False) if config.checkpointing else gen.decode(x)
            scores = score_parts(images)
            run.nfe_forward += steps * n
            stacked = torch.stack([scores[k] for k in names], dim=1)            # [N, R]
            select = (stacked.detach() * selection_weights).sum(1).cpu()
            detached = {k: v.detach().cpu() for k, v in scores.items()}
            improved = select > run.best_rewards
            imgs_cpu = images.detach().cpu()
            if run.best_images is None:
                run.best_images = imgs_cpu.clone()
            run.best_rewards = torch.where(improved, select, run.best_rewards)
            run.best_iteration[improved] = it
            run.best_images[improved] = imgs_cpu[improved]
            run.best_noise[improved.to(eps.device)] = eps.detach()[improved.to(eps.device)]
            run.best_parts = {k: torch.where(improved, v, run.best_parts.get(k, v)) for k, v in detached.items()}
            norm = eps.detach().float().flatten(1).norm(dim=1).cpu()
            run.rewards.append(select)
            run.parts.append(detached)
            run.noise_norms.append(norm)
            if config.keep_images:
                run.images.append(imgs_cpu)
            if matched_iterations is not None and it + 1 == matched_iterations:
                run.matched = {"iterations": matched_iterations, "rewards": run.best_rewards.clone(),
                               "images": run.best_images.clone(), "noise": run.best_noise.clone()}
            if it < config.iterations - 1:
                reg = chi_norm_nll(eps) * config.reg_weight if config.reg_weight else torch.zeros(n, device=eps.device)
                if config.multiclip:
                    grad = torch.zeros_like(eps)
                    for j in range(len(names)):
                        term = -(weights[:, j] * stacked[:, j])
                        if config.reg_per_reward:
                            term = term + reg
                        (g,) = torch.autograd.grad(term.sum(), eps, retain_graph=True)
                        grad = grad + _clip_rows(g, config.grad_clip)
                    if not config.reg_per_reward and config.reg_weight:
                        (g,) = torch.autograd.grad(reg.sum(), eps)
                        grad = grad + g
                    run.nfe_backward += back_per_iter * n * len(names)
                else:
                    loss = (-(weights * stacked).sum(1) + reg).sum()
                    (grad,) = torch.autograd.grad(loss, eps)
                    run.nfe_backward += back_per_iter * n
                if config.checkpointing:
                    run.nfe_recompute += back_per_iter * n * (len(names) if config.multiclip else 1)
                if not torch.isfinite(grad).all():
                    run.stopped = f"non-finite gradient at iteration {it}; returned the best iterate so far"
                    yield _state(run, it, config.iterations)
                    break
                eps.grad = _clip_rows(grad, config.grad_clip)
                opt.step()
            yield _state(run, it, config.iterations)
    if matched_iterations is not None and run.matched is None:
        run.matched = {"iterations": len(run.rewards), "rewards": run.best_rewards.clone(),
                       "images": run.best_images.clone(), "noise": run.best_noise.clone()}
    yield run


def _state(run: NoiseRun, it: int, total: int) -> IterationState:
    return IterationState(it, total, run.rewards[-1], run.parts[-1], run.images[-1] if run.images else None,
                          run.noise_norms[-1], run.best_rewards.clone(), run.nfe_forward + run.nfe_backward)


def run_reno(gen: Generator, prompts: list[str], reward, config: ReNOConfig, seed: int = 0,
             metadata: list[dict] | None = None) -> Iterator[Progress]:
    """ReNO on each prompt from the noise of ``seed`` (row i: ``gen.initial_noise(B, seed)[i]``, as
    ``flowalign.generate``); yields a ``Progress`` per iteration, the last one carrying the result."""
    guidance = gen.default_guidance if config.guidance is None else config.guidance
    cond = gen.encode(prompts, config.negative_prompt if guidance != 1.0 else None)
    noise = gen.initial_noise(len(prompts), torch.Generator().manual_seed(seed))
    run = None
    for item in run_noise_optimization(gen, cond, noise, reward, config, metadata=metadata, method="reno"):
        if isinstance(item, NoiseRun):
            run = item
            break
        yield Progress("reno", "optimize", item.iteration + 1, item.total, item.rewards, item.best_rewards,
                       item.images, item.nfe)
    result = OptimizeResult(
        "reno", list(prompts), run.best_images, run.best_rewards, run.best_parts, run.best_noise.cpu(),
        run.best_iteration, [seed] * len(prompts), torch.stack(run.rewards), torch.stack(run.noise_norms),
        run.images, list(range(len(prompts))), [seed] * len(prompts), run.nfe_forward, run.nfe_backward,
        run.nfe_recompute, stopped=run.stopped)
    finish_render(gen, result, reward, config, cond, metadata)
    yield Progress("reno", "done", len(run.rewards), config.iterations, run.rewards[-1], run.best_rewards,
                   None, result.nfe, result)


