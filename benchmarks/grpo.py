"""GRPO on the toy digits model: one iteration's time split and its overhead over the pure model passes,
and reward gained per 1,000 rollout NFEs for each variant.  Run: ``python -m benchmarks.grpo``.

Overhead, side by side in one run (alternating, medians after a warm-up): a full iteration
(sampling, decode + reward, advantages, training) against the model passes it needs replayed alone:
the rollout's velocity calls, the decode and reward passes, and a forward + backward of the policy on
each training minibatch (the same sizes and conditioning rows).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from flowalign.config import load_config
from flowalign.training import make_trainer
from flowalign.training.report import evaluate_policy, heldout_prompts
from flowalign.training.trainer import Trainer

RESULTS = Path(__file__).resolve().parent / "results"
BOLD = ["reward.weights={toy/bold_digit: 1.0}", "reward.aggregate=reward"]  # the same task for every variant
VARIANTS = {"Flow-GRPO": ("configs/toy/digits_flow_grpo.yaml", []),
            "Flow-GRPO-Fast": ("configs/toy/digits_flow_grpo_fast.yaml", []),
            "Flow-GRPO + CPS": ("configs/toy/digits_flow_grpo.yaml", ["modifiers.cps.noise_level=0.8"]),
            "DanceGRPO": ("configs/toy/digits_dance_grpo.yaml", []),
            "MixGRPO": ("configs/toy/digits_mix_grpo.yaml", BOLD),
            "MixGRPO-Flash": ("configs/toy/digits_mix_grpo_flash.yaml", BOLD),
            "GRPO-Guard": ("configs/toy/digits_grpo_guard.yaml", []),
            "TempFlow-GRPO": ("configs/toy/digits_tempflow_grpo.yaml", ["tempflow_grpo.group_size=4"]),
            "G2RPO": ("configs/toy/digits_g2rpo.yaml", ["g2rpo.group_size=4"]),
            "Dynamic-TreeRPO": ("configs/toy/digits_tree_grpo.yaml", []),
            "Pref-GRPO (judge)": ("configs/toy/digits_pref_grpo.yaml", []),
            "AC-Flow": ("configs/toy/digits_ac_flow.yaml", []),
            "ORW-CFM-W2": ("configs/toy/digits_orw_cfm_w2.yaml", []),
            "DRAGON (DPO)": ("configs/toy/digits_dragon.yaml",
                             ["dragon.group_size=2", "train.prompts_per_iteration=16"])}


def make(config: str, extra: list[str], args, out: str) -> Trainer:
    plain = load_config(config)
    group = [f"{plain.method}.group_size={args.group}"] if hasattr(plain.options, "group_size") else []
    overrides = [f"train.prompts_per_iteration={args.prompts}", *group,
                 f"train.steps={args.steps}", "train.checkpoint_every=0", "train.eval_prompts=0",
                 f"train.iterations={args.iterations}", f"output_dir={out}", *extra]  # extra overrides last
    return make_trainer(load_config(config, overrides))


def pure_passes(tr: Trainer, iteration: int):
    """A function replaying the model passes of one iteration without the toolkit around them."""
    calls = []
    gen = tr.gen
    original = gen.velocity

    def record(x, sigma, c, guidance=1.0):
        calls.append((x, sigma, c, guidance))
        return original(x, sigma, c, guidance)

    gen.velocity = record
    try:
        batch = tr.rollout(iteration)
    finally:
        gen.velocity = original
    rollout, prompts, meta, cond = batch.rollout, batch.prompts, batch.metadata, batch.cond
    media = gen.decode(rollout.leaves)
    rows = rollout.leaf_row.tolist()
    n, bs = rollout.num_transitions, tr.t.train_batch

    def replay():
        with torch.no_grad():
            for x, sigma, c, guidance in calls:
                original(x, sigma, c, guidance)
            tr.reward.score(gen.decode(rollout.leaves), [prompts[r] for r in rows], [meta[r] for r in rows])
        for start in range(0, n, bs):
            idx = torch.arange(start, min(start + bs, n))
            v = original(rollout.x[idx], rollout.sigma[idx], cond.select(rollout.row[idx]), tr.t.guidance)
            v.float().pow(2).mean().backward()
        tr.optimizer.zero_grad(set_to_none=True)

    return replay, media


def overhead(args) -> dict:
    tr = make(*VARIANTS["Flow-GRPO"], args, "/tmp/flowalign_bench_grpo")
    replay, _ = pure_passes(tr, 0)
    splits = []

    def iteration():
        splits.append(tr.run_iteration(0)[0])

    iteration(), replay()  # warm-up
    t_iter, t_pure = [], []
    for _ in range(args.repeats):
        for fn, times in ((iteration, t_iter), (replay, t_pure)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    split = {k: statistics.median(s[k] for s in splits) for k in splits[0] if k.startswith("time/")}
    return {"iteration_s": statistics.median(t_iter), "pure_s": statistics.median(t_pure),
            "overhead": statistics.median(t_iter) / statistics.median(t_pure), "split": split}


def gain_per_nfe(args) -> dict:
    from flowalign import rewards
    out = {}
    bold = rewards.load("toy/bold_digit")  # every variant is judged on the same held-out reward
    for name, (config, extra) in VARIANTS.items():
        tr = make(config, extra, args, f"/tmp/flowalign_bench_{name.split()[0]}")
        prompts, meta = heldout_prompts(args.eval_prompts, None)
        before = evaluate_policy(tr.gen, bold, prompts, meta, 10, tr.t.guidance)[1].mean().item()
        history = tr.fit(progress=False)
        after = evaluate_policy(tr.gen, bold, prompts, meta, 10, tr.t.guidance)[1].mean().item()
        nfe = sum(h["nfe"] for h in history)
        seconds = sum(h["time/sampling"] + h["time/reward"] + h["time/training"] for h in history)
        out[name] = {"before": before, "after": after, "nfe": nfe, "gain_per_1k_nfe": (after - before) / nfe * 1e3,
                     "seconds": seconds, "seconds_per_iteration": seconds / len(history)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--eval-prompts", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    ov = overhead(args)
    gains = gain_per_nfe(args)
    s = ov["split"]
    print(f"toy digits, {args.prompts} groups x {args.group}, {args.steps} steps, CFG 3, "
          f"CPU {torch.get_num_threads()} threads")
    print(f"one iteration: sampling {s['time/sampling']:.2f}s, reward {s['time/reward']:.2f}s, "
          f"training {s['time/training']:.2f}s; total {ov['iteration_s']:.2f}s "
          f"vs pure model passes {ov['pure_s']:.2f}s")
    print(f"{'variant':<20}{'before':>9}{'after':>9}{'rollout NFE':>13}{'gain/1k NFE':>13}{'s/iter':>9}")
    for name, g in gains.items():
        print(f"{name:<20}{g['before']:>9.4f}{g['after']:>9.4f}{g['nfe']:>13.0f}{g['gain_per_1k_nfe']:>13.5f}"
              f"{g['seconds_per_iteration']:>9.2f}")
    print(f"headline: iteration time / pure model passes = {ov['overhead']:.3f}x")
    RESULTS.mkdir(exist_ok=True)
    result = {"args": vars(args), "overhead": ov, "variants": gains}
    (RESULTS / "grpo.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
