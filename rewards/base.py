"""The reward protocol: pointwise, pairwise and set rewards (docs/rewards.md).

Batching, device, dtype and input checks are handled here once, not in every plug-in: a subclass
implements ``_score`` (or ``_prefer``) on a chunk that is already on its device, in its dtype, and
checked against its ``input_spec``. A non-finite score is an error naming the sample, never passed on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from .ensemble import Objective, ensemble_score
from .errors import RewardError
from .media import AudioVideo, media_part

Modality = Literal["image", "video", "audio", "audio_video"]
#: The layout each modality's media has: image [B,3,H,W], video [B,F,3,H,W], audio [B,C,L]; ``audio_video``
#: rewards take ``AudioVideo`` media (a clip and its soundtrack, ``media.py``).
LAYOUTS = {"image": "BCHW", "video": "BFCHW", "audio": "BCL"}


@dataclass(frozen=True)
class InputSpec:
    """What a reward expects: value range, tensor layout, and a preferred size (None: any)."""

    range: tuple[float, float] = (0.0, 1.0)
    layout: str = "BCHW"
    size: tuple[int, ...] | None = None


class Reward(nn.Module):
    """A pointwise reward: ``score(media, prompts, metadata) -> Tensor[B]`` (higher is better)."""

    name: str = "reward"
    modality: Modality = "image"
    differentiable: bool = False
    input_spec: InputSpec = InputSpec()
    #: Samples per forward pass; a long batch is cut into chunks of this size.
    batch_size: int = 64
    #: Check the range of the input (one host sync per call; turn off in a hot loop you trust).
    check_range: bool = True
    #: Scores a group's samples against each other (pairwise, groupwise): a training run keeps each prompt's
    #: samples on one process and never rescores them one at a time.
    whole_groups: bool = False

    def _score(self, media: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device_dtype(self) -> tuple[torch.device | None, torch.dtype | None]:
        """Where the reward's weights live (None for a weightless reward: it follows its input)."""
        param = next(self.parameters(), None)
        if param is None:
            return None, None
        return param.device, (param.dtype if param.is_floating_point() else None)

    def media_for(self, media):
        """The part of joint audio+video media this reward scores (its modality's); other media as they are."""
        return media_part(media, self.modality, self.name)

    def check_media(self, media) -> None:
        """One clear line when the media are not what this reward takes (type, layout, channels, range)."""
        if self.modality == "audio_video":
            if not isinstance(media, AudioVideo):
                raise RewardError(f"reward {self.name}: expected audio+video media (AudioVideo), "
                                  f"got {type(media).__name__}")
            return
        layout = LAYOUTS.get(self.modality, self.input_spec.layout)
        if not isinstance(media, torch.Tensor):
            raise RewardError(f"reward {self.name}: expected a tensor of {self.modality} media, "
                              f"got {type(media).__name__}")
        if not media.is_floating_point():
            raise RewardError(f"reward {self.name}: expected floating-point media, got {media.dtype}")
        if media.ndim != len(layout):
            raise RewardError(f"reward {self.name}: expected {self.modality} media of layout {layout} "
                              f"({len(layout)} dims), got shape {tuple(media.shape)}")
        if "C" in layout and self.modality != "audio" and media.shape[layout.index("C")] != 3:
            raise RewardError(f"reward {self.name}: expected 3 colour channels in {layout}, "
                              f"got shape {tuple(media.shape)}")
        if self.check_range and media.numel():
            lo, hi = self.input_spec.range
            low, high = torch.aminmax(media.detach())
            if low.item() < lo - 1e-3 or high.item() > hi + 1e-3:
                raise RewardError(f"reward {self.name}: expected values in [{lo}, {hi}], got [{low.item():.3g}, "
                                  f"{high.item():.3g}]")

    def score(self, media: torch.Tensor, prompts: list[str] | None = None,
              metadata: list[dict] | None = None) -> torch.Tensor:
        """Score a batch; gradients flow to ``media`` when the reward is differentiable."""
        media = self.media_for(media)
        self.check_media(media)
        n = len(media)
        prompts = list(prompts) if prompts is not None else [""] * n
        metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
        if len(prompts) != n or len(metadata) != n:
            raise RewardError(f"reward {self.name}: {n} samples but {len(prompts)} prompts, {len(metadata)} metadata")
        device, dtype = self.device_dtype
        device, dtype = device or media.device, dtype or media.dtype
        grad = torch.enable_grad() if self.differentiable and media.requires_grad else torch.no_grad()
        with grad:
            chunks = [self._score(media[i:i + self.batch_size].to(device, dtype), prompts[i:i + self.batch_size],
                                  metadata[i:i + self.batch_size]) for i in range(0, n, self.batch_size)]
        scores = torch.cat([c.reshape(-1) for c in chunks]).float().to(media.device)
        if scores.numel() != n or any(c.numel() != len(prompts[i * self.batch_size:(i + 1) * self.batch_size])
                                      for i, c in enumerate(chunks)):
            raise RewardError(f"reward {self.name}: {scores.numel()} scores for {n} samples")
        return check_finite(scores, self.name)

    def forward(self, media: torch.Tensor, prompts: list[str] | None = None,
                metadata: list[dict] | None = None) -> torch.Tensor:
        return self.score(media, prompts, metadata)


def check_finite(scores: torch.Tensor, name: str) -> torch.Tensor:
    """Raise on a NaN or infinite score, naming the first offending sample (one host sync)."""
    bad = ~torch.isfinite(scores.detach())
    if bad.any().item():
        index = int(bad.nonzero()[0, 0])
        raise RewardError(f"reward {name}: non-finite score {scores[index].item()} for sample {index} "
                          f"({int(bad.sum())} of {scores.numel()} non-finite)")
    return scores


class PairwiseReward(Reward):
    """A preference model: ``prefer(a, b, prompts) -> P(a ≻ b)`` per pair, in [0, 1].

    As a pointwise reward (``score``), each sample's win rate against the others of its group (Pref-GRPO,
    docs/methods/flow_grpo.md): every unordered pair is judged once, a tie counts 0.5 for each side.
    ``metadata[i]["group"]`` names the group (default: all samples form one group).

    A judge of several preference dimensions (``dimensions``: their names) returns ``[pairs, D]``: each sample
    then has one win rate per dimension (``win_rates``), and its score is their mean weighted by
    ``dimension_weights`` (name -> weight; 1 for a dimension it omits)."""

    dimensions: tuple[str, ...] = ()
    dimension_weights: dict[str, float] | None = None
    whole_groups = True

    def _prefer(self, a: torch.Tensor, b: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def prefer(self, a: torch.Tensor, b: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        self.check_media(a)
        self.check_media(b)
        if a.shape != b.shape:
            raise RewardError(f"reward {self.name}: pairs need equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
        prompts = list(prompts) if prompts is not None else [""] * a.shape[0]
        device, dtype = self.device_dtype
        device, dtype = device or a.device, dtype or a.dtype
        grad = torch.enable_grad() if self.differentiable and (a.requires_grad or b.requires_grad) else torch.no_grad()
        with grad:
            chunks = [self._prefer(a[i:i + self.batch_size].to(device, dtype),
                                   b[i:i + self.batch_size].to(device, dtype),
                                   prompts[i:i + self.batch_size]) for i in range(0, a.shape[0], self.batch_size)]
        return check_finite(torch.cat(chunks).float().to(a.device), self.name)

    def score(self, media, prompts=None, metadata=None) -> torch.Tensor:
        rates = self.win_rates(media, prompts, metadata)
        if rates.ndim == 1:
            return rates
        names = self.dimensions or tuple(str(d) for d in range(rates.shape[1]))
        weights = torch.tensor([float((self.dimension_weights or {}).get(name, 1.0)) for name in names],
                               device=rates.device)
        return (rates * weights).sum(dim=1) / weights.sum()

    def win_rates(self, media, prompts=None, metadata=None) -> torch.Tensor:
        """Each sample's win rate against the others of its group: ``[n]``, or ``[n, D]`` for a judge of D
        dimensions (0.5 for a sample alone in its group)."""
        media = self.media_for(media)
        n = media.shape[0]
        prompts = list(prompts) if prompts is not None else [""] * n
        groups = [m.get("group", 0) for m in metadata] if metadata is not None else [0] * n
        left, right = [], []
        for i in range(n):
            for j in range(i + 1, n):
                if groups[i] == groups[j]:
                    left.append(i)
                    right.append(j)
        if not left:
            return torch.full((n, len(self.dimensions)) if self.dimensions else (n,), 0.5, device=media.device)
        li, ri = torch.tensor(left, device=media.device), torch.tensor(right, device=media.device)
        p = self.prefer(media[li], media[ri], [prompts[i] for i in left])
        wins = torch.zeros((n, *p.shape[1:]), device=media.device).index_add(0, li, p).index_add(0, ri, 1 - p)
        ones = torch.ones(len(left), device=media.device)
        games = torch.zeros(n, device=media.device).index_add(0, li, ones).index_add(0, ri, ones)
        return wins / games.clamp_min(1).view(-1, *[1] * (p.ndim - 1))


class SetReward(Reward):
    """A reward against a reference set, from embeddings: per sample (instance-to-distribution) through
    ``score``, and for the whole batch (distribution-to-distribution) through ``score_set``."""

    def embed(self, media: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        raise NotImplementedError

    def score_set(self, media: torch.Tensor, prompts: list[str] | None = None,
                  metadata: list[dict] | None = None) -> torch.Tensor:
        """One number for the whole batch (higher is better)."""
        raise NotImplementedError


class CompositeReward(Reward):
    """Rewards combined into one score, each optionally normalised first.

    ``normalize``: ``none``; ``batch`` (z-score within the batch); ``running`` (z-score with running
    statistics, updated by each call, so scales stay comparable across batches). ``objective``: the weighted
    sum, or a conservative ensemble objective over the parts as members (``ensemble.py``)."""

    def __init__(self, rewards: dict[str, Reward], weights: dict[str, float],
                 normalize: Literal["none", "batch", "running"] = "none", momentum: float = 0.01,
                 objective: Objective = "weighted_sum", penalty: float = 0.5):
        super().__init__()
        self.parts = nn.ModuleDict(rewards)
        self.weights = dict(weights)
        self.normalize, self.momentum = normalize, momentum
        self.objective, self.penalty = objective, penalty
        self.name = "+".join(f"{w:g}*{k}" for k, w in self.weights.items())
        if objective != "weighted_sum":
            self.name = f"{objective}({self.name})"
        self.differentiable = all(r.differentiable for r in rewards.values())
        self.modality = next(iter(rewards.values())).modality
        self.whole_groups = any(r.whole_groups for r in rewards.values())
        self.stats: dict[str, tuple[float, float]] = {}

    def check_media(self, media) -> None:  # each part checks its own input
        pass

    def score_all(self, media: torch.Tensor, prompts: list[str] | None = None,
                  metadata: list[dict] | None = None) -> dict[str, torch.Tensor]:
        """Every part's raw score, by name (for logging)."""
        return {k: r.score(media, prompts, metadata) for k, r in self.parts.items()}

    def _normalized(self, name: str, s: torch.Tensor, population: torch.Tensor) -> torch.Tensor:
        """``s`` z-scored with the statistics of ``population`` (batch) or the running ones updated by it."""
        if self.normalize == "batch" and population.numel():
            std = population.std(unbiased=False) if population.numel() > 1 else torch.zeros_like(population[0])
            return (s - population.mean()) / (std + 1e-6)
        if self.normalize == "running" and population.numel():
            mean, var = population.detach().mean().item(), population.detach().var(unbiased=False).item()
            old = self.stats.get(name)
            if old is not None:
                mean = (1 - self.momentum) * old[0] + self.momentum * mean
                var = (1 - self.momentum) * old[1] + self.momentum * var
            self.stats[name] = (mean, var)
            return (s - mean) / (var ** 0.5 + 1e-6)
        return s

    def combine(self, scores: dict[str, torch.Tensor], gather: Callable | None = None) -> torch.Tensor:
        """The objective over raw scores (by part name), each normalised first. A row with a NaN score (a skipped
        sample) stays NaN and is left out of the normalisation statistics. ``gather`` (every process's values
        of a tensor) makes those statistics the whole batch's, whatever the number of processes."""
        if self.normalize != "none":
            seen = {k: gather(s.detach().contiguous()) if gather else s for k, s in scores.items()}
            valid = torch.stack([torch.isfinite(v) for v in seen.values()]).all(dim=0)
            scores = {k: self._normalized(k, s, seen[k][valid]) for k, s in scores.items()}
        return ensemble_score(scores, self.weights, self.objective, self.penalty)

    def score_parts(self, media, prompts=None, metadata=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted (normalised) sum and each part's raw score (detached), in one pass."""
        scores = self.score_all(media, prompts, metadata)
        return self.combine(scores), {k: s.detach() for k, s in scores.items()}

    def score(self, media, prompts=None, metadata=None) -> torch.Tensor:
        return self.score_parts(media, prompts, metadata)[0]

    def normalization_state(self) -> dict[str, list[float]]:
        """The running statistics of ``normalize: running`` (a resumed run must continue from them)."""
        return {k: list(v) for k, v in self.stats.items()}

    def load_normalization_state(self, state: dict[str, list[float]]) -> None:
        self.stats = {k: (float(v[0]), float(v[1])) for k, v in state.items()}
