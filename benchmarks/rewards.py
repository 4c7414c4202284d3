"""Reward throughput: samples per second of every toy reward and of each tiny real-architecture reward
(tiny random weights, real code paths) at batch sizes 1, 8 and 64.  Run: ``python -m benchmarks.rewards``.

Each entry is a (name, factory) pair; medians over repeats after a warm-up call. Toy rewards get random
images ``[B,3,16,16]``, tiny real ones ``[B,3,64,64]`` (video ``[B,4,3,64,64]``, audio ``[B,1,L]`` of one
second). A tiny reward whose module or class does not exist yet is listed as skipped, not an error.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from flowalign import rewards
from flowalign.rewards.base import Reward

from . import tiny_rewards

RESULTS = Path(__file__).resolve().parent / "results"
#: a prompt each modality's toy rewards can read (the digit, the digit and its direction, the melody)
PROMPTS = {"image": "a handwritten seven", "video": "a seven moving to the right",
           "audio": "a slow ascending C major scale"}
Entry = tuple[str, Callable[[], Reward]]


def toy_entries() -> list[Entry]:
    """Every registered toy reward, loaded by name."""
    return [(name, lambda name=name: rewards.load(name)) for name in rewards.available() if name.startswith("toy/")]


def tiny_entries(folder: Path) -> list[Entry]:
    """Every tiny real-architecture reward, its checkpoint built under ``folder`` when first asked for."""
    return [(name, lambda name=name, build=build: build(folder / name.replace("/", "_")))
            for name, build in tiny_rewards.TINY.items()]


def random_media(reward: Reward, batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random media in the reward's input range and layout (video: 4 frames; audio: two mono seconds)."""
    if reward.modality == "video":
        shape = (batch, 4, 3, size, size)
    elif reward.modality == "audio":
        shape = (batch, 1, 2 * int(getattr(reward, "sample_rate", 16000)))
    else:
        shape = (batch, 3, size, size)
    lo, hi = reward.input_spec.range
    return lo + (hi - lo) * torch.rand(shape, generator=generator)


def samples_per_second(reward: Reward, media: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median wall time of one ``score`` call (after a warm-up) and the samples per second it gives."""
    prompts = [PROMPTS[reward.modality]] * media.shape[0]
    metadata = [{"group": i // 8} for i in range(media.shape[0])]
    reward.score(media, prompts, metadata)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        reward.score(media, prompts, metadata)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return median, media.shape[0] / median


def bench_entry(name: str, factory: Callable[[], Reward], size: int, batches: list[int], repeats: int) -> dict:
    """One reward's figures per batch size, or why it was skipped."""
    try:
        with tiny_rewards.quiet():
            reward = factory()
    except tiny_rewards.Unavailable as err:
        return {"skipped": str(err)}
    if not isinstance(reward, Reward):  # e.g. toy/music_encoder: an embedding model the set rewards use
        return {"skipped": f"{name} is an encoder, not a reward"}
    reward.eval()
    generator = torch.Generator().manual_seed(0)
    figures = {"modality": reward.modality, "differentiable": reward.differentiable, "batch": {}}
    for batch in batches:
        median, rate = samples_per_second(reward, random_media(reward, batch, size, generator), repeats)
        figures["batch"][str(batch)] = {"median_s": median, "samples_per_s": rate}
    return figures


def row(name: str, figures: dict, batches: list[int]) -> str:
    """One table line: samples per second per batch size, or "skipped (not available)"."""
    if "skipped" in figures:
        return f"{name:<18}{'':<8}skipped (not available)"
    rates = "".join(f"{figures['batch'][str(b)]['samples_per_s']:>12,.0f}" for b in batches)
    return f"{name:<18}{figures['modality']:<8}{rates}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="benchmark only the rewards whose name contains this")
    parser.add_argument("--verbose", action="store_true", help="print why skipped rewards were skipped")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results: dict[str, dict] = {}
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        groups = [("toy", 16, toy_entries()), ("tiny", 64, tiny_entries(Path(tmp)))]
        for kind, size, entries in groups:
            for name, factory in entries:
                if args.only not in name:
                    continue
                figures = {"kind": kind, "size": size, **bench_entry(name, factory, size, args.batches, args.repeats)}
                results[name] = figures
                lines.append(row(name, figures, args.batches))
    print(f"reward throughput, samples/s (median of {args.repeats} after a warm-up), CPU "
          f"{torch.get_num_threads()} threads; toy 16x16, tiny real-architecture 64x64")
    print(f"{'reward':<18}{'media':<8}" + "".join(f"{'B=' + str(b):>12}" for b in args.batches))
    print("\n".join(lines))
    if args.verbose:
        for name, figures in results.items():
            if "skipped" in figures:
                print(f"  skipped {figures['skipped']}")
    print(headline(results, max(args.batches)))
    RESULTS.mkdir(exist_ok=True)
    out = {"args": vars(args), "torch_threads": torch.get_num_threads(), "rewards": results}
    (RESULTS / "rewards.json").write_text(json.dumps(out, indent=2))
    return out


def headline(results: dict, batch: int) -> str:
    """The slowest toy and tiny rewards at the largest batch, and how many tiny rewards were skipped."""
    parts = []
    for kind in ("toy", "tiny"):
        timed = {n: f["batch"][str(batch)]["samples_per_s"] for n, f in results.items()
                 if f["kind"] == kind and "batch" in f}
        if timed:
            slowest = min(timed, key=timed.get)
            parts.append(f"slowest {kind} reward at B={batch}: {slowest} {timed[slowest]:,.0f} samples/s")
    skipped = sum("skipped" in f for f in results.values())
    return f"headline: {'; '.join(parts) or 'nothing timed'}; {skipped} skipped"


if __name__ == "__main__":
    main()
