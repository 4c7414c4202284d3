"""What every noise-optimisation method shares: its results and progress reports, the parts of a composite
reward, rendering the best noise, scoring a selection, and the seeds x prompts batch layout."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import FlowalignError
from ..generators.base import Conditioning, Generator


@dataclass
class IterationState:
    """One iteration of a noise optimisation, for progress reporting."""

    iteration: int
    total: int
    rewards: torch.Tensor                      # [N] selection reward of this iterate
    parts: dict[str, torch.Tensor]             # each reward's raw score, [N]
    images: torch.Tensor | None                # [N,3,H,W] (detached, CPU) when keep_images
    noise_norm: torch.Tensor                   # [N] ||ε||
    best_rewards: torch.Tensor                 # [N] best so far
    nfe: int                                   # forward + backward NFEs so far


@dataclass
class NoiseRun:
    """Everything one noise optimisation found, row by row (best by the selection reward)."""

    best_noise: torch.Tensor
    best_images: torch.Tensor
    best_rewards: torch.Tensor
    best_parts: dict[str, torch.Tensor]
    best_iteration: torch.Tensor
    rewards: list[torch.Tensor] = field(default_factory=list)
    parts: list[dict[str, torch.Tensor]] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    noise_norms: list[torch.Tensor] = field(default_factory=list)
    nfe_forward: int = 0
    nfe_backward: int = 0
    nfe_recompute: int = 0
    stopped: str | None = None
    #: the best within the first ``matched_iterations`` iterations (CARINOX's compute-matched "i30")
    matched: dict | None = None


def reward_parts(reward) -> tuple[dict[str, object], dict[str, float]]:
    """The parts and weights of a reward: a CompositeReward's own, or ``{name: reward}`` with weight 1."""
    parts = getattr(reward, "parts", None)
    if parts is not None and hasattr(reward, "weights"):
        return dict(parts.items()), dict(reward.weights)
    return {reward.name: reward}, {reward.name: 1.0}


def require_differentiable(parts: dict[str, object], method: str) -> None:
    """One line naming the first reward that gives no gradient."""
    for name, reward in parts.items():
        if not getattr(reward, "differentiable", False):
            raise FlowalignError(f"{method}: reward '{name}' is not differentiable (it needs gradients with "
                                 "respect to the image; use --method best-of-n or a differentiable reward)")


@torch.no_grad()
def render(gen: Generator, noise: torch.Tensor, cond: Conditioning, steps: int, guidance: float) -> torch.Tensor:
    """Decoded ODE samples from ``noise`` (no graph)."""
    from ..samplers import euler_ode

    sigmas = gen.sigmas(steps)
    x = euler_ode(lambda x, s: gen.velocity(x, s, cond, guidance), gen.initial_state(noise, sigmas[0]), sigmas)
    return gen.decode(x)


@torch.no_grad()
def score_selection(reward, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None,
                    selection_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The selection reward ([N]) and each part's score, without gradients."""
    parts, part_weights = reward_parts(reward)
    names = list(parts)
    scores = {k: parts[k].score(images, prompts, metadata).float().cpu() for k in names}
    stacked = torch.stack([scores[k] for k in names], dim=1)
    if selection_weights is None:
        selection_weights = torch.tensor([[part_weights[k] for k in names]], dtype=torch.float32)
    return (stacked * selection_weights.cpu()).sum(1), scores


@dataclass
class Progress:
    """What an optimisation reports after each iteration (for a progress bar or the app's live view).

    Row r of ``rewards`` / ``images`` is the run for prompt ``row_prompt[r]`` from seed ``row_seed[r]``."""

    method: str
    stage: str                         # "optimize" | "explore" | "sample" | "render"
    iteration: int                     # 1-based count within the stage
    total: int
    rewards: torch.Tensor              # [R] this iterate's selection reward per row
    best: torch.Tensor                 # [B] the best reward so far per prompt
    images: torch.Tensor | None        # [R,3,H,W] this iterate's images
    nfe: int                           # forward + backward model evaluations so far
    result: "OptimizeResult | None" = None   # set on the last report


@dataclass
class OptimizeResult:
    """The outcome of ``flowalign.optimize``: the best image per prompt and how it was found."""

    method: str
    prompts: list[str]
    images: torch.Tensor               # [B,3,H,W] best image per prompt (rendered with render_steps if set)
    rewards: torch.Tensor              # [B] its selection reward (at the optimisation steps)
    parts: dict[str, torch.Tensor]     # each reward's raw score of the best image, [B]
    noise: torch.Tensor                # [B,*latent] the best initial noise
    best_iteration: torch.Tensor       # [B] the iteration (ReNO/CARINOX) or candidate (best-of-N) it came from
    best_seed: list[int]
    trajectory: torch.Tensor           # [I,R] selection reward of every iterate of every row
    noise_norms: torch.Tensor | None   # [I,R] ||ε|| per iterate (None for best-of-N)
    iteration_images: list[torch.Tensor]   # per iteration [R,3,H,W] (empty when keep_images=False)
    row_prompt: list[int]
    row_seed: list[int]
    nfe_forward: int
    nfe_backward: int
    nfe_recompute: int = 0
    render_rewards: torch.Tensor | None = None   # [B] the reward of the re-rendered best image
    stopped: str | None = None
    matched: dict | None = None        # CARINOX: the best within the compute-matched iteration budget

    @property
    def nfe(self) -> int:
        """Model evaluations: forward passes plus backward passes (a backward counted as one NFE)."""
        return self.nfe_forward + self.nfe_backward

    @property
    def image(self) -> torch.Tensor:
        return self.images[0]

    @property
    def reward(self) -> float:
        return float(self.rewards[0])


def finish_render(gen: Generator, result: OptimizeResult, reward, config, cond: Conditioning,
                  metadata: list[dict] | None, selection_weights: torch.Tensor | None = None) -> None:
    """"Optimise with few steps, render with many": re-render the best noise with ``render_steps``."""
    if not config.render_steps or config.render_steps == (config.steps or gen.default_steps):
        return
    guidance = gen.default_guidance if config.guidance is None else config.guidance
    images = render(gen, result.noise.to(gen.device), cond, config.render_steps, guidance)
    result.render_rewards, _ = score_selection(reward, images, result.prompts, metadata, selection_weights)
    result.images = images.cpu()
    result.nfe_forward += config.render_steps * len(result.prompts)


def tile(cond: Conditioning, k: int) -> Conditioning:
    """The whole batch ``k`` times over (row ``c·B + i`` is prompt i): the layout of seeds × prompts."""
    if k == 1:
        return cond
    rep = lambda t: t.repeat(k, *[1] * (t.ndim - 1))  # noqa: E731
    return Conditioning(list(cond.prompts) * k, {n: rep(v) for n, v in cond.positive.items()},
                        None if cond.negative is None else {n: rep(v) for n, v in cond.negative.items()},
                        dict(cond.extras))


ProgressFn = Callable[[IterationState], None]
