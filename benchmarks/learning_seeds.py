"""Each learning recipe on several training seeds: the spread the learning tests measure their gains against.

    python -m benchmarks.learning_seeds [--seeds 0 1 2] [--only NAME ...]

Every run uses the learning tests' budget (the GRPO family: 16 iterations of 4 prompts, 8 steps; the
forward-process methods: 10 iterations of their configs' batches, AC-Flow 16; the video toy: 16 of its config's)
and is judged on the same held-out prompts and seeds by its training reward and by a metric it does not optimise
(``toy/judge_digit``, a second digit reader: a logistic regression on 8x8 pixels, not the CNN inside the reward;
for the video recipe, whether the clips still move the prompted way). Writes
``benchmarks/results/learning_seeds.json``: per recipe the gain of each training seed, their mean and std, and
the judge's accuracy before and after.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "learning_seeds.json"
EVAL = ["train.eval_prompts=60", "train.eval_steps=10", "train.checkpoint_every=0"]
#: the GRPO family's budget: 16 iterations of 4 prompts, 8 steps
GRPO = ["train.iterations=16", "train.prompts_per_iteration=4", "train.steps=8", *EVAL]
#: the forward-process methods: 10 iterations of their configs' batches
FM = ["train.iterations=10", *EVAL]


@dataclass(frozen=True)
class Recipe:
    config: str
    overrides: list[str]
    floor: float                                # the smallest gain its learning test accepts, whatever the spread
    judged_on: dict[str, float] | None = None   # the reward its gain is measured on (None: its training reward)
    judge: str = "toy/judge_digit"              # a metric outside the reward, which must not collapse ...
    judge_floor: float = 0.75                   # ... below this


#: the video toy: Flow-GRPO-Fast on bold digits in every frame, 16 iterations of its config's 8 prompts x 8 (with 4
#: prompts the gain varied between training seeds as much as its size)
VIDEO = ["train.iterations=16", "train.checkpoint_every=0"]


RECIPES = {
    "flow_grpo": Recipe("configs/toy/digits_flow_grpo.yaml", GRPO, 0.1),
    "dance_grpo": Recipe("configs/toy/digits_dance_grpo.yaml", GRPO, 0.08),
    "grpo_guard": Recipe("configs/toy/digits_grpo_guard.yaml", GRPO, 0.1),
    "cps": Recipe("configs/toy/digits_flow_grpo.yaml", [*GRPO, "modifiers.cps.noise_level=0.8"], 0.1),
    "mix_grpo": Recipe("configs/toy/digits_mix_grpo.yaml", GRPO, 0.04),
    "mix_grpo_flash": Recipe("configs/toy/digits_mix_grpo_flash.yaml", GRPO, 0.05),
    "tempflow_grpo": Recipe("configs/toy/digits_tempflow_grpo.yaml", GRPO, 0.06),
    "g2rpo": Recipe("configs/toy/digits_g2rpo.yaml", GRPO, 0.04),
    "tree_grpo": Recipe("configs/toy/digits_tree_grpo.yaml", GRPO, 0.1),
    "dr_grpo": Recipe("configs/toy/digits_dr_grpo.yaml", GRPO, 0.1),
    # Pref-GRPO trains on its judge's win rates: its gain is measured on the utility the judge was trained on
    "pref_grpo": Recipe("configs/toy/digits_pref_grpo.yaml", GRPO, 0.08, {"toy/ink": 1.0, "toy/centered": 1.0}),
    # AC-Flow's critic trains alone for 3 iterations: 16 in all (at 10 the gain varied as much as its size)
    "ac_flow": Recipe("configs/toy/digits_ac_flow.yaml", ["train.iterations=16", *EVAL], 0.1),
    "dragon": Recipe("configs/toy/digits_dragon.yaml", FM, 0.1),
    # the methods that train on the forward process without SDE log-probs; NFT and AWM sample without CFG
    "diffusion_nft": Recipe("configs/toy/digits_diffusion_nft.yaml", FM, 0.1),
    "awm": Recipe("configs/toy/digits_awm.yaml", FM, 0.1),
    "dgpo": Recipe("configs/toy/digits_dgpo.yaml", FM, 0.1),
    # a reward on frames only: the clips must keep moving the prompted way (no freezing hack)
    "video_flow_grpo": Recipe("configs/toy/video_flow_grpo.yaml", VIDEO, 0.05, judge="toy/motion_match",
                              judge_floor=0.95),
}


def run_recipe(name: str, seed: int, out: Path) -> dict:
    """One training run of a recipe with training seed ``seed``: its held-out reward and the judge's accuracy,
    before and after (the same held-out prompts and seeds for every training seed)."""
    from flowalign import rewards
    from flowalign.config import load_config
    from flowalign.training import make_trainer
    from flowalign.training.report import evaluate_policy, heldout_prompts

    recipe = RECIPES[name]
    cfg = load_config(recipe.config, [*recipe.overrides, f"train.seed={seed}", f"output_dir={out}"])
    trainer = make_trainer(cfg)
    reward = trainer.reward if recipe.judged_on is None else rewards.load_weighted(recipe.judged_on)
    judge = rewards.load(recipe.judge)
    prompts, meta = heldout_prompts(cfg.train.eval_prompts, None, trainer.world)
    t = cfg.train

    def measure() -> tuple[float, float]:
        media, scores = evaluate_policy(trainer.gen, reward, prompts, meta, t.eval_steps, t.guidance)
        return scores.mean().item(), judge.score(media, prompts, meta).mean().item()

    before, judge_before = measure()
    start = time.perf_counter()
    history = trainer.fit(progress=False)
    seconds = time.perf_counter() - start
    after, judge_after = measure()
    trainer.acc.end_training()
    return {"seed": seed, "before": before, "after": after, "gain": after - before, "judge_before": judge_before,
            "judge_after": judge_after, "train_seconds": seconds, "history": history}


def summarise(runs: list[dict]) -> dict:
    gains = [r["gain"] for r in runs]
    return {"runs": [{k: v for k, v in r.items() if k != "history"} for r in runs],
            "gain_mean": statistics.mean(gains), "gain_std": statistics.stdev(gains),
            "judge_before": runs[0]["judge_before"], "judge_after_min": min(r["judge_after"] for r in runs)}


def recorded(name: str) -> dict:
    """A recipe's recorded spread (what the learning tests read their bars from)."""
    return json.loads(RESULTS.read_text())["recipes"][name]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args(argv)
    result = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"recipes": {}}
    result.update(seeds=args.seeds, threads=torch.get_num_threads(),
                  command="python -m benchmarks.learning_seeds")
    print(f"{'recipe':<16}{'gain mean':>10}{'± std':>9}{'seeds':>7}  judge before -> after (min)")
    for name in args.only:
        runs = [run_recipe(name, seed, Path(f"/tmp/flowalign_seeds/{name}_{seed}")) for seed in args.seeds]
        recipe = RECIPES[name]
        summary = {"config": recipe.config, "overrides": recipe.overrides, "floor": recipe.floor,
                   "judge": recipe.judge, **summarise(runs)}
        result["recipes"][name] = summary
        print(f"{name:<16}{summary['gain_mean']:>10.4f}{summary['gain_std']:>9.4f}{len(runs):>7}  "
              f"{summary['judge_before']:.3f} -> {summary['judge_after_min']:.3f}", flush=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
