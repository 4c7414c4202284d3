"""Sample efficiency as the forward-process papers measure it: rollout NFEs until the held-out reward reaches a
target, for Flow-GRPO, the best GRPO variant per NFE, DiffusionNFT, AWM and DGPO on the same task and budget as
``benchmarks.grpo``. Run: ``python -m benchmarks.efficiency``.

Each method trains ``--iterations`` iterations; before and every ``--every`` iterations the policy is evaluated on
the same held-out prompts and seeds (the bold-digit reward, ODE samples). The NFE at which a curve first reaches a
target is interpolated linearly between evaluations; a curve that never reaches it reads "not reached". Two
targets: an absolute reward (the papers' "steps to reach a score") and a gain over the method's own start (the
CFG-free methods start lower: they sample without CFG).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flowalign import rewards
from flowalign.training.report import evaluate_policy, heldout_prompts

from .grpo import VARIANTS, make

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["Flow-GRPO", "Dynamic-TreeRPO", "DiffusionNFT", "AWM", "DGPO"]


def curve(name: str, args) -> dict:
    """Held-out reward against cumulative rollout NFEs (and seconds) for one method."""
    config, extra = VARIANTS[name]
    tr = make(config, extra, args, f"/tmp/flowalign_efficiency_{name.split()[0]}")
    bold = rewards.load("toy/bold_digit")
    prompts, meta = heldout_prompts(args.eval_prompts, None)
    score = lambda: evaluate_policy(tr.gen, bold, prompts, meta, 10, tr.t.guidance)[1].mean().item()  # noqa: E731
    points, start = [{"iteration": 0, "nfe": 0.0, "seconds": 0.0, "reward": score()}], time.perf_counter()
    for stop in range(args.every, args.iterations + 1, args.every):
        tr.t.iterations = stop  # fit runs up to here and the next call continues (none of these reads the total)
        history = tr.fit(progress=False)
        points.append({"iteration": stop, "nfe": sum(h["nfe"] for h in history),
                       "seconds": sum(h["time/sampling"] + h["time/reward"] + h["time/training"] for h in history),
                       "reward": score()})
    tr.acc.end_training()
    return {"points": points, "wall_seconds": time.perf_counter() - start}


def first_reach(points: list[dict], target: float, key: str = "nfe") -> float | None:
    """The ``key`` (NFE or seconds) at which the reward first reaches ``target``, linear between evaluations."""
    for before, after in zip(points, points[1:]):
        if after["reward"] >= target > before["reward"]:
            share = (target - before["reward"]) / (after["reward"] - before["reward"])
            return before[key] + share * (after[key] - before[key])
    return 0.0 if points[0]["reward"] >= target else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=36)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--eval-prompts", type=int, default=60)
    parser.add_argument("--target", type=float, default=0.85, help="the absolute held-out reward to reach")
    parser.add_argument("--gain", type=float, default=0.2, help="the gain over the method's own start to reach")
    args = parser.parse_args(argv)
    curves = {name: curve(name, args) for name in METHODS}
    table = {}
    for name, c in curves.items():
        p = c["points"]
        table[name] = {"start": p[0]["reward"], "end": p[-1]["reward"], "nfe_total": p[-1]["nfe"],
                       "nfe_to_target": first_reach(p, args.target),
                       "nfe_to_gain": first_reach(p, p[0]["reward"] + args.gain),
                       "seconds_to_gain": first_reach(p, p[0]["reward"] + args.gain, "seconds")}
    print(f"{'method':<18}{'start':>8}{'end':>8}{'NFE to ' + str(args.target):>14}{'NFE to +' + str(args.gain):>13}"
          f"{'× Flow-GRPO':>13}")
    base = table["Flow-GRPO"]["nfe_to_gain"]
    for name, r in table.items():
        ratio = f"{base / r['nfe_to_gain']:.2f}×" if base and r["nfe_to_gain"] else "-"
        fmt = lambda v: "not reached" if v is None else f"{v:.0f}"  # noqa: E731
        print(f"{name:<18}{r['start']:>8.4f}{r['end']:>8.4f}{fmt(r['nfe_to_target']):>14}"
              f"{fmt(r['nfe_to_gain']):>13}{ratio:>13}")
    result = {"command": "python -m benchmarks.efficiency", "args": vars(args), "methods": table, "curves": curves}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "efficiency.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
