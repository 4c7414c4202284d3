"""Compare: the base model and aligned LoRA checkpoints on the same prompts and seeds, each sample scored.

``run_compare`` is what the Compare tab calls; it takes plain values, so tests call it directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FlowalignError
from ..inference import generate
from .limits import Limits, check_float, check_int, check_prompts
from .models import ModelCache, check_lora_folder, load_adapters, using

BASE = "base"


@dataclass
class CompareSample:
    """One sample: which model made it, from which prompt and seed, and its reward scores."""

    variant: str
    prompt: str
    seed: int
    media: torch.Tensor
    scores: dict[str, float]

    def caption(self) -> str:
        """Short enough to show whole under a tile: the row is the prompt and seed, the table below names the
        rewards (in this order)."""
        return f"{self.variant} · seed {self.seed} · " + " / ".join(f"{v:.3f}" for v in self.scores.values())


@dataclass
class CompareResult:
    """Every sample, ordered prompt by prompt, seed by seed, variant by variant (base first)."""

    modality: str
    variants: list[str]
    prompts: list[str]
    seeds: list[int]
    rewards: list[str]
    samples: list[CompareSample]
    settings: dict

    def table(self) -> tuple[list[str], list[list]]:
        """Column names and rows (prompt, seed, variant, one column per reward)."""
        return (["prompt", "seed", "model", *self.rewards],
                [[s.prompt, s.seed, s.variant, *(round(s.scores[r], 4) for r in self.rewards)] for s in self.samples])

    def means(self) -> dict[str, dict[str, float]]:
        """Mean score per variant and reward."""
        out = {}
        for v in self.variants:
            rows = [s for s in self.samples if s.variant == v]
            out[v] = {r: sum(s.scores[r] for s in rows) / len(rows) for r in self.rewards}
        return out

    def pair(self, index: int, variant: str) -> tuple[CompareSample, CompareSample]:
        """Base and ``variant`` on the ``index``-th (prompt, seed)."""
        width = len(self.variants)
        group = self.samples[index * width:(index + 1) * width]
        if not group:
            raise FlowalignError(f"pair {index}: out of range")
        return group[0], next(s for s in group if s.variant == variant)


def variant_label(folder: Path, taken: set[str]) -> str:
    """A short, unique label for a checkpoint folder: ``run/final`` style."""
    label = "/".join(folder.parts[-2:])
    while label in taken:
        label += "'"
    return label


def parse_seeds(seed, samples, limits: Limits) -> list[int]:
    """``samples`` consecutive seeds from ``seed``."""
    first = check_int("seed", seed, 0, 2 ** 31 - 1, "seed")
    count = check_int("samples per prompt", samples, 1, limits.max_samples, "limits.max_samples")
    return list(range(first, first + count))


def score_all(cache: ModelCache, names: list[str], media: torch.Tensor, prompts: list[str]) -> dict[str, list[float]]:
    """Each reward's raw score of every sample (no gradients)."""
    with torch.no_grad():
        return {n: cache.reward(n, media.device).score(media, prompts, None).float().cpu().tolist() for n in names}


def run_compare(cache: ModelCache, limits: Limits, model: str, checkpoints: list[str], prompts: str | list[str],
                seed: int = 0, samples: int = 1, steps: int | None = None, guidance: float | None = None,
                lora_scale: float = 1.0, reward_names: list[str] = ()) -> CompareResult:
    """Sample the base and each checkpoint on the same prompts and seeds; score every sample with every reward."""
    prompts = check_prompts(prompts, limits)
    seeds = parse_seeds(seed, samples, limits)
    if len(prompts) * len(seeds) > limits.max_batch:
        raise FlowalignError(f"{len(prompts)} prompts x {len(seeds)} seeds = {len(prompts) * len(seeds)} samples "
                             f"per model, this app takes at most {limits.max_batch} (limits.max_batch)")
    folders = [check_lora_folder(c) for c in dict.fromkeys(c for c in (checkpoints or []) if str(c).strip())]
    if len(folders) > limits.max_checkpoints:
        raise FlowalignError(f"checkpoints: {len(folders)} chosen, this app compares at most "
                             f"{limits.max_checkpoints} (limits.max_checkpoints)")
    names = list(dict.fromkeys(reward_names or []))
    if not names:
        raise FlowalignError("rewards: choose at least one reward to score with")
    if len(names) > limits.max_rewards:
        raise FlowalignError(f"rewards: {len(names)} chosen, this app takes at most {limits.max_rewards} "
                             "(limits.max_rewards)")
    steps = None if steps in (None, "") else check_int("steps", steps, 1, limits.max_steps, "limits.max_steps")
    blank = guidance is None or not str(guidance).strip()
    guidance = None if blank else check_float("CFG scale", guidance, 0.0, limits.max_guidance, "limits.max_guidance")
    scale = check_float("LoRA scale", lora_scale, 0.0, limits.max_lora_scale, "limits.max_lora_scale")
    loaded = cache.model(model)
    for n in names:
        cache.reward(n, loaded.generator.device)  # unknown names fail before any sampling
    batch = [p for p in prompts for _ in seeds]
    labels, variants = [BASE], [(BASE, None)]
    with loaded.lock:
        adapters = load_adapters(loaded, folders)
    for folder in folders:
        label = variant_label(folder, set(labels))
        labels.append(label)
        variants.append((label, adapters[folder]))
    media_by_variant, scores_by_variant = {}, {}
    for label, adapter in variants:
        with using(loaded, adapter, scale) as gen:
            media = torch.cat([generate(gen, prompts, steps=steps, guidance=guidance, seed=s) for s in seeds])
        order = [j * len(prompts) + i for i in range(len(prompts)) for j in range(len(seeds))]  # prompt-major
        media = media[torch.tensor(order)]
        scores_by_variant[label] = score_all(cache, names, media, batch)
        media_by_variant[label] = media.cpu()
    gen = loaded.generator
    out = []
    for k, (prompt, s) in enumerate((p, s) for p in prompts for s in seeds):
        for label in labels:
            out.append(CompareSample(label, prompt, s, media_by_variant[label][k],
                                     {n: scores_by_variant[label][n][k] for n in names}))
    return CompareResult(gen.modality, labels, prompts, seeds, names, out,
                         {"steps": steps or gen.default_steps,
                          "guidance": gen.default_guidance if guidance is None else guidance, "lora_scale": scale})
