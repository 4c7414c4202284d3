"""Training on the toy digits model: each family's iteration time over the model passes it needs, and the
held-out reward gained per 1,000 rollout NFEs by every method.  Run: ``python -m benchmarks.grpo``.

Overhead, per family (Flow-GRPO with and without KL, a trunk-sharing tree, Flash's solver tail, AC-Flow, DRAGON):
a full iteration against the model passes it made replayed alone (every velocity call, with a backward where the
iteration took gradients; its decodes and its reward call), alternated ``repeats`` times after a warm-up; the
median of the per-repeat ratios and their range are printed. Gains: every method on the same task (bold digits),
judged on the same held-out prompts and seeds by the bold-digit reward and by ``toy/judge_digit``, a second
digit judge no method optimises.
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
            "Flow-GRPO + KL": ("configs/toy/digits_flow_grpo.yaml", ["modifiers.kl.beta=0.04"]),
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
                             ["dragon.group_size=2", "train.prompts_per_iteration=16"]),
            # int(0.99 * 8 steps) = 7 grid levels per sample, as the code's int(0.99 * 10) = 9 of 10
            "DiffusionNFT": ("configs/toy/digits_diffusion_nft.yaml", ["diffusion_nft.fm_draws=7"]),
            "AWM": ("configs/toy/digits_awm.yaml", []),
            "DGPO": ("configs/toy/digits_dgpo.yaml", [])}


def make(config: str, extra: list[str], args, out: str) -> Trainer:
    plain = load_config(config)
    group = [f"{plain.method}.group_size={args.group}"] if hasattr(plain.options, "group_size") else []
    overrides = [f"train.prompts_per_iteration={args.prompts}", *group,
                 f"train.steps={args.steps}", "train.checkpoint_every=0", "train.eval_prompts=0",
                 f"train.iterations={args.iterations}", f"output_dir={out}", *extra]  # extra overrides last
    return make_trainer(load_config(config, overrides))


def pure_passes(tr: Trainer, iteration: int):
    """A function replaying the model passes one iteration needs, without the toolkit around them: every
    velocity call it made (forward, and a backward where it took gradients: training minibatches; no-grad
    ones: sampling, old log-probs, the KL reference), its decodes and its reward call."""
    gen = tr.gen
    velocity, decode = gen.velocity, gen.decode
    calls, latents = [], []

    def record_velocity(x, sigma, c, guidance=1.0):
        calls.append((x.detach(), sigma, c, guidance, torch.is_grad_enabled()))
        return velocity(x, sigma, c, guidance)

    def record_decode(x):
        latents.append(x.detach())
        return decode(x)

    gen.velocity, gen.decode = record_velocity, record_decode
    try:
        _, batch = tr.run_iteration(iteration)
    finally:
        del gen.velocity, gen.decode  # back to the class's methods
    prompts, meta = batch.leaf_prompts, batch.leaf_metadata()

    def replay():
        for x, sigma, c, guidance, grad in calls:
            if grad:
                velocity(x, sigma, c, guidance).float().pow(2).mean().backward()
            else:
                with torch.no_grad():
                    velocity(x, sigma, c, guidance)
        with torch.no_grad():
            media = torch.cat([decode(x) for x in latents])
            if tr.method.family != "flow_matching" or tr.method.scores_pointwise:
                tr.reward.score(media, prompts, meta)
        tr.optimizer.zero_grad(set_to_none=True)

    return replay


#: the overhead is measured for each family: Flow-GRPO with and without KL (a reference pass per minibatch),
#: a trunk-sharing plan, Flash's solver tail, and the two forward-process methods
OVERHEAD = ["Flow-GRPO", "Flow-GRPO + KL", "Dynamic-TreeRPO", "MixGRPO-Flash", "AC-Flow", "DRAGON (DPO)"]


def overhead(name: str, args) -> dict:
    """Iteration time over its pure model passes, alternating the two, ``repeats`` times after a warm-up:
    the median of the per-repeat ratios and their range."""
    tr = make(*VARIANTS[name], args, f"/tmp/flowalign_bench_overhead_{name.split()[0]}")
    iteration = 3  # past AC-Flow's critic warm-up, so its actor trains too
    replay = pure_passes(tr, iteration)
    splits, ratios = [], []
    for repeat in range(args.repeats + 1):
        start = time.perf_counter()
        splits.append(tr.run_iteration(iteration)[0])
        t_iter = time.perf_counter() - start
        start = time.perf_counter()
        replay()
        t_pure = time.perf_counter() - start
        if repeat:  # the first pair warms up
            ratios.append(t_iter / t_pure)
    split = {k: statistics.median(s[k] for s in splits[1:]) for k in splits[0] if k.startswith("time/")}
    return {"overhead": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "ratios": ratios,
            "split": split}


def gain_per_nfe(args) -> dict:
    """Every variant on the same task, judged on the same held-out bold-digit reward and by the second digit
    judge (``toy/judge_digit``), which no variant optimises."""
    from flowalign import rewards

    out = {}
    bold, judge = rewards.load("toy/bold_digit"), rewards.load("toy/judge_digit")
    prompts, meta = heldout_prompts(args.eval_prompts, None)
    for name, (config, extra) in VARIANTS.items():
        if name == "Flow-GRPO + KL" or (args.only and name not in args.only):  # KL: in the overhead table only
            continue
        tr = make(config, extra, args, f"/tmp/flowalign_bench_{name.split()[0]}")
        before = evaluate_policy(tr.gen, bold, prompts, meta, 10, tr.t.guidance)[1].mean().item()
        history = tr.fit(progress=False)
        media, scores = evaluate_policy(tr.gen, bold, prompts, meta, 10, tr.t.guidance)
        after, judged = scores.mean().item(), judge.score(media, prompts, meta).mean().item()
        nfe = sum(h["nfe"] for h in history)
        seconds = sum(h["time/sampling"] + h["time/reward"] + h["time/training"] for h in history)
        out[name] = {"before": before, "after": after, "judge_after": judged, "nfe": nfe,
                     "gain_per_1k_nfe": (after - before) / nfe * 1e3, "seconds": seconds,
                     "seconds_per_iteration": seconds / len(history)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--eval-prompts", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=None,
                        help="re-measure these variants' gains only, keeping the rest of results/grpo.json")
    args = parser.parse_args(argv)
    if args.only:
        return remeasure(args)
    overheads = {name: overhead(name, args) for name in OVERHEAD}
    gains = gain_per_nfe(args)
    print(f"toy digits, {args.prompts} groups x {args.group}, {args.steps} steps, CFG 3, "
          f"CPU {torch.get_num_threads()} threads")
    print(f"{'overhead of':<20}{'sampling s':>11}{'reward s':>10}{'training s':>12}{'iteration / pure passes':>26}")
    for name, ov in overheads.items():
        s = ov["split"]
        print(f"{name:<20}{s['time/sampling']:>11.2f}{s['time/reward']:>10.2f}{s['time/training']:>12.2f}"
              f"{ov['overhead']:>12.3f}x  [{ov['min']:.3f}, {ov['max']:.3f}]")
    print(f"{'variant':<20}{'before':>9}{'after':>9}{'judge':>8}{'rollout NFE':>13}{'gain/1k NFE':>13}{'s/iter':>9}")
    for name, g in gains.items():
        print(f"{name:<20}{g['before']:>9.4f}{g['after']:>9.4f}{g['judge_after']:>8.3f}{g['nfe']:>13.0f}"
              f"{g['gain_per_1k_nfe']:>13.5f}{g['seconds_per_iteration']:>9.2f}")
    worst = max(overheads, key=lambda n: overheads[n]["overhead"])
    print(f"headline: iteration time / pure model passes, worst family = {overheads[worst]['overhead']:.3f}x "
          f"({worst}; median of {args.repeats}, range [{overheads[worst]['min']:.3f}, {overheads[worst]['max']:.3f}])")
    RESULTS.mkdir(exist_ok=True)
    result = {"command": "python -m benchmarks.grpo", "args": vars(args), "threads": torch.get_num_threads(),
              "overhead": overheads, "variants": gains}
    (RESULTS / "grpo.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def remeasure(args) -> dict:
    """The gains of ``args.only`` measured again with the recorded run's settings, written into its results."""
    result = json.loads((RESULTS / "grpo.json").read_text())
    for key, value in result["args"].items():
        if key not in ("only",):
            setattr(args, key, value)
    gains = gain_per_nfe(args)
    for name, g in gains.items():
        print(f"{name:<20}{g['before']:>9.4f}{g['after']:>9.4f}{g['judge_after']:>8.3f}{g['nfe']:>13.0f}"
              f"{g['gain_per_1k_nfe']:>13.5f}{g['seconds_per_iteration']:>9.2f}")
    result["variants"].update(gains)
    result["remeasured"] = sorted(set(result.get("remeasured", [])) | set(gains))
    (RESULTS / "grpo.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
