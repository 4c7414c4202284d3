"""The end-of-run report: before/after grids on fixed held-out seeds and prompts, the reward curve, metrics."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..inference import generate, save_grid
from ..prompt_sets import PromptSet
from ..rewards.media import AudioVideo

EVAL_SEED = 10_007  # never a training seed: training draws from (seed, iteration)


def heldout_prompts(n: int, file_prompts: PromptSet | None, world: str = "digits") -> tuple[list[str], list[dict]]:
    """The first n prompts of a prompt set (``train.eval_prompt_file``, the anchors' test split, or else the
    training file), or held-out prompts of the toy ``world`` (phrasings never used in training)."""
    if file_prompts is not None:
        return file_prompts.rows(list(range(min(n, len(file_prompts)))))
    from .prompts import toy_prompts

    return toy_prompts(world, n, EVAL_SEED, held_out=True)


@torch.no_grad()
def evaluate_policy(gen, reward, prompts, meta, steps: int, guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ODE samples on fixed seeds and their rewards (the policy as users will sample it)."""
    media = generate(gen, prompts, steps=steps, guidance=guidance, seed=EVAL_SEED, metadata=meta)
    return media, reward.score(media, prompts, meta)


def _save_media(media, stem: Path, sample_rate: int | None) -> None:
    """Up to 50 images or clips as ``<stem>.png``; audio (or a soundtrack) as a few ``<stem>_*.wav`` to listen to."""
    from ..inference import save_wav

    if isinstance(media, AudioVideo):
        save_grid(media.video[:50], stem.with_suffix(".png"))
        save_wav(media.audio[:8], stem.with_suffix(".wav"), media.sample_rate)
    elif media.ndim == 3:  # audio [B,C,L]
        save_wav(media[:8], stem.with_suffix(".wav"), sample_rate or 16_000)
    else:
        save_grid(media[:50], stem.with_suffix(".png"))


def write_report(out: Path, before: tuple, after: tuple, history: list[dict], extra: dict,
                 sample_rate: int | None = None) -> dict:
    """``report/{before,after}.png`` (audio: ``before_*.wav`` / ``after_*.wav`` at ``sample_rate``; audio+video:
    both), ``reward_curve.png`` and ``metrics.json``; returns the metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    for name, media in (("before", before[0]), ("after", after[0])):
        _save_media(media, report / name, sample_rate)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([h["iteration"] for h in history], [h["reward/mean"] for h in history])
    ax.set_xlabel("iteration")
    ax.set_ylabel("training reward (mean)")
    fig.tight_layout()
    fig.savefig(report / "reward_curve.png", dpi=100)
    plt.close(fig)
    if any("monitor/reward" in h for h in history):
        draw_monitor(report / "monitor.png", history, extra.get("monitor") or {})
    metrics = {**_summary("reward_before", before[1]), **_summary("reward_after", after[1]), "history": history,
               **extra}
    (report / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _summary(name: str, scores: torch.Tensor) -> dict[str, float | int]:
    """Mean and std over the samples the reward scored; how many it skipped (NaN: ``reward.on_error=skip``)."""
    scored = scores[torch.isfinite(scores)].float()
    return {name: scored.mean().item() if scored.numel() else float("nan"),
            f"{name}_std": scored.std().item() if scored.numel() > 1 else 0.0,
            f"{name}_skipped": int(scores.numel() - scored.numel())}


def draw_monitor(path: Path, history: list[dict], monitor: dict) -> None:
    """One small plot per guard metric against the iterations completed (0: before training), the alarm marked."""
    import matplotlib.pyplot as plt

    first = monitor.get("first") or {}
    keys = sorted({k for h in history for k in h if k.startswith("monitor/") and k != "monitor/alarm"})
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 2.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(0, first[key])] if key in first else []
        points += [(h["iteration"] + 1, h[key]) for h in history if key in h]
        ax.plot(*zip(*points), marker="o", markersize=3)
        for h in history:
            if h.get("monitor/alarm"):
                ax.axvline(h["iteration"] + 1, color="tab:red", linestyle="--", linewidth=1)
        ax.set_title(key.removeprefix("monitor/"), fontsize=9)
        ax.set_xlabel("iterations done", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
