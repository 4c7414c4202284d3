"""Rollout structures: NFEs per scored leaf (vs independent trajectories) and sampler overhead over the
pure model passes, on the shipped toy digits model.  Run: ``python -m benchmarks.samplers``.

Measured side by side in one run, alternating, medians over repeats after a warm-up: the rollout's wall
time; the same model calls (same batches, σ and conditioning rows) replayed alone ("model"); and the
rollout with the model replaced by a lookup of its recorded outputs ("engine": everything the toolkit
adds). The headline is the direct ratio rollout / model, measured back to back ``repeats`` times: the median of
the paired ratios, with their range (this machine's noise); (model + engine) / model is printed beside it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import flowalign
from benchmarks.timing import paired_ratio, time_side_by_side
from flowalign.samplers.kernels import flow_grpo
from flowalign.samplers.rollout import run_plan
from flowalign.samplers.structures import branches, independent, singular, tree

RESULTS = Path(__file__).resolve().parent / "results"


def structure_plans(sigmas: torch.Tensor, prompts: int, group: int) -> dict:
    """Each structure sized to score ``group`` leaves per prompt (or a group per branch point)."""
    T = len(sigmas) - 1
    depth = max(1, group.bit_length() - 1)  # binary tree with 2**depth == group leaves
    return {
        "independent (Flow-GRPO)": independent(sigmas, prompts, group),
        "shared-prefix window (Fast)": independent(sigmas, prompts, group, sde_steps=[T // 4, T // 4 + 1],
                                                   share_prefix=True),
        "branches (TempFlow)": branches(sigmas, prompts, [0, T // 4, T // 2], num_branches=group),
        "singular (G2RPO)": singular(sigmas, prompts, [0, T // 4], group_size=group, strides=(1, 2, 3)),
        "tree (Dynamic-TreeRPO)": tree(sigmas, prompts, list(range(0, 2 * depth, 2)), branching=2),
    }




def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    gen = flowalign.load_generator("toy/digits")
    prompts = [f"a handwritten {w}" for w in ["one", "two", "three", "four", "five", "six", "seven", "eight"]]
    cond = gen.encode(prompts[: args.prompts])
    sigmas = gen.sigmas(args.steps)
    calls: list[tuple] = []

    @torch.no_grad()
    def velocity(x, sigma, rows):
        calls.append((x, sigma, rows))
        return gen.velocity(x, sigma, cond.select(rows), guidance=gen.default_guidance)

    rows_out, figures = [], {}
    indep_nfe_per_leaf = None
    for name, (roots, root_rows) in structure_plans(sigmas, args.prompts, args.group).items():
        x0 = gen.initial_noise(len(roots), torch.Generator().manual_seed(0))

        def rollout():
            calls.clear()
            return run_plan(velocity, roots, root_rows, x0, flow_grpo(0.7), torch.Generator().manual_seed(0))

        result = rollout()
        recorded = list(calls)
        outputs = [gen.velocity(x, s, cond.select(r), guidance=gen.default_guidance) for x, s, r in recorded]

        def engine_only():
            replies = iter(outputs)
            run_plan(lambda x, s, r: next(replies), roots, root_rows, x0, flow_grpo(0.7),
                     torch.Generator().manual_seed(0))

        @torch.no_grad()
        def replay():
            for x, sigma, rows in recorded:
                gen.velocity(x, sigma, cond.select(rows), guidance=gen.default_guidance)

        direct = paired_ratio(rollout, replay, args.repeats)
        t_rollout, t_model = direct["a_s"], direct["b_s"]
        t_engine, _ = time_side_by_side(engine_only, lambda: None, args.repeats)
        overhead = (t_model + t_engine) / t_model
        per_leaf = result.nfe / result.leaves.shape[0]
        indep_nfe_per_leaf = indep_nfe_per_leaf or per_leaf
        figures[name] = {"nfe": result.nfe, "leaves": int(result.leaves.shape[0]), "nfe_per_leaf": per_leaf,
                         "nfe_per_leaf_vs_independent": per_leaf / indep_nfe_per_leaf,
                         "transitions": result.num_transitions, "rollout_s": t_rollout, "model_s": t_model,
                         "engine_s": t_engine, "overhead": overhead, "direct_ratio": direct["ratio"],
                         "direct_min": direct["ratio_min"], "direct_max": direct["ratio_max"]}
        rows_out.append(f"{name:<30}{result.nfe:>6}{result.leaves.shape[0]:>7}{per_leaf:>10.2f}"
                        f"{per_leaf / indep_nfe_per_leaf:>9.2f}x{t_model * 1e3:>10.1f}{t_engine * 1e3:>10.1f}"
                        f"{overhead:>9.3f}x{direct['ratio']:>9.3f}x  [{direct['ratio_min']:.3f}, "
                        f"{direct['ratio_max']:.3f}]")
    worst_name = max(figures, key=lambda n: figures[n]["direct_ratio"])
    worst = figures[worst_name]["direct_ratio"]
    print(f"toy digits, {args.prompts} prompts, group {args.group}, {args.steps} steps, CFG batched, CPU "
          f"{torch.get_num_threads()} threads")
    print(f"{'structure':<30}{'NFE':>6}{'leaves':>7}{'NFE/leaf':>10}{'vs ind.':>10}{'model ms':>10}{'engine ms':>10}"
          f"{'overhead':>10}{'direct':>10}  range")
    print("\n".join(rows_out))
    print(f"headline: rollout wall time / pure model passes (direct, median of {args.repeats} pairs), worst "
          f"structure = {worst:.3f}x ({worst_name}; range [{figures[worst_name]['direct_min']:.3f}, "
          f"{figures[worst_name]['direct_max']:.3f}])")
    RESULTS.mkdir(exist_ok=True)
    out = {"command": "python -m benchmarks.samplers", "args": vars(args), "structures": figures,
           "worst_direct_ratio": worst}
    (RESULTS / "samplers.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
