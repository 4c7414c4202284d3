"""The reward-hacking defences side by side on the toy's hacked task (the uncapped bold digit: more ink always pays).

    python -m benchmarks.hacking [--seeds 0 1] [--only NAME ...] [--prompts 32]

Every defence trains Flow-GRPO for the same budget (its config's 40 iterations of 8 prompts x 8); then the
trained policy and the base model sample the same held-out prompts x 2 seeds, and each run is measured on what
the plain run optimises (the uncapped bold-digit reward and the mean ink) and on what no run optimises: the
held-out digit accuracy of the second judge (``toy/judge_digit``), the toy CLIP score of the prompt (which
the two-reward rows train on), the per-prompt diversity (pixel Vendi score over the 2 seeds) and the mean
distance to the base model's samples. Writes ``benchmarks/results/hacking.json``
(``python -m benchmarks.figures`` renders the README's table from it) and ``docs/images/hacking.png``: the
first 12 held-out prompts drawn by the base model and by each defence's first training seed, on the same
initial noise.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "hacking.json"
GRID = Path(__file__).resolve().parents[1] / "docs" / "images" / "hacking.png"
STRIPS = Path("outputs/bench_hacking/strips.pt")  # each defence's samples for the grid, kept between --only runs
UNCAPPED = "configs/toy/digits_uncapped_flow_grpo.yaml"
QUIET = ["monitor.every=0", "train.eval_prompts=0", "train.checkpoint_every=0"]
TWO_REWARDS = ["reward.weights={toy/bold_digit: 1, toy/clipscore: 1}"]
#: name -> (config, overrides)
DEFENCES = {
    "Flow-GRPO, no defence": (UNCAPPED, []),
    "KL to the base, beta 0.04": (UNCAPPED, ["modifiers.kl.beta=0.04"]),
    "KL to the base, beta 0.1": (UNCAPPED, ["modifiers.kl.beta=0.1"]),
    "KL to the base, beta 0.15": (UNCAPPED, ["modifiers.kl.beta=0.15"]),
    "KL to the base, beta 0.4": (UNCAPPED, ["modifiers.kl.beta=0.4"]),
    "ensemble of 4 classifier seeds, worst case": ("configs/toy/digits_uncapped_ensemble.yaml", []),
    "ensemble of 4 classifier seeds, UWO 0.5": ("configs/toy/digits_uncapped_ensemble.yaml",
                                                ["reward.objective=uncertainty_weighted"]),
    "GARDO (beta 0.04)": ("configs/toy/digits_uncapped_gardo.yaml", []),
    "GARDO, beta 0.4": ("configs/toy/digits_uncapped_gardo.yaml", ["modifiers.gardo.beta=0.4"]),
    # two rewards that pull apart: more ink, and the toy CLIP score of the prompt (neither is the judge)
    "bold + CLIP score, per-reward advantages summed": (UNCAPPED, [*TWO_REWARDS, "reward.aggregate=advantage"]),
    "bold + CLIP score, MARBLE": (UNCAPPED, [*TWO_REWARDS, "reward.aggregate=marble"]),
}


def held_out(trainer, prompts: int, seeds_per_prompt: int = 2) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """The policy's and the base model's samples of the same held-out prompts and seeds."""
    from flowalign.inference import generate
    from flowalign.training.lora import adapters_disabled
    from flowalign.training.report import heldout_prompts

    texts, meta = heldout_prompts(prompts, None, "digits")
    texts = [p for p in texts for _ in range(seeds_per_prompt)]
    meta = [m for m in meta for _ in range(seeds_per_prompt)]
    t = trainer.t
    sample = lambda: generate(trainer.gen, texts, steps=t.eval_steps, guidance=t.guidance,  # noqa: E731
                              seed=20_011, batch_size=t.rollout_batch)
    with torch.no_grad():
        policy = sample()
        with adapters_disabled(trainer.gen.trainable_module, True):
            base = sample()
    return policy, base, texts, meta


def measure(media: torch.Tensor, base: torch.Tensor, texts: list, meta: list) -> dict[str, float]:
    from flowalign import rewards
    from flowalign.training.monitor import per_prompt_diversity

    score = lambda name, **kw: rewards.load(name, **kw).score(media, texts, meta).mean().item()  # noqa: E731
    return {"bold_uncapped": score("toy/bold_digit", target_ink=1.0), "ink": score("toy/ink"),
            "judge": score("toy/judge_digit"), "clipscore": score("toy/clipscore"),
            "diversity": per_prompt_diversity(media, 2),
            "distance_to_base": (media.float() - base.float()).abs().mean().item()}


def run(name: str, seed: int, prompts: int) -> dict:
    from flowalign.config import load_config
    from flowalign.training import make_trainer

    config, overrides = DEFENCES[name]
    cfg = load_config(config, [*overrides, *QUIET, f"train.seed={seed}",
                               f"output_dir=outputs/bench_hacking/{name.replace(' ', '_')}_{seed}"])
    trainer = make_trainer(cfg)
    start = time.perf_counter()
    trainer.fit(progress=False)
    seconds = time.perf_counter() - start
    policy, base, texts, meta = held_out(trainer, prompts)
    strips = {"policy": policy[::2][:12].cpu(), "base": base[::2][:12].cpu(), "prompts": texts[::2][:12]}
    return {"seed": seed, "seconds": seconds, "after": measure(policy, base, texts, meta),
            "base": measure(base, base, texts, meta)}, strips


def draw(strips: dict[str, dict], path: Path) -> None:
    """One row per model: the base, then each defence; the same prompts and initial noise in every column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    first = next(iter(strips.values()))
    rows = {"base model": first["base"], **{name: s["policy"] for name, s in strips.items()}}
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 0.95 * len(rows) + 0.4))
    for ax, (name, media) in zip(axes, rows.items()):
        grid = make_grid(media.float().clamp(0, 1), nrow=len(media), padding=1, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(name, fontsize=9, loc="left")
        ax.axis("off")
    fig.suptitle("held-out prompts: " + ", ".join(p.split()[-1] for p in first["prompts"]), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(runs: list[dict]) -> dict[str, float]:
    """Each metric's mean over training seeds, and the base model's (the same for every seed)."""
    keys = runs[0]["after"]
    out = {k: statistics.fmean(r["after"][k] for r in runs) for k in keys}
    out.update({f"{k}_std": statistics.pstdev(r["after"][k] for r in runs) for k in keys})
    out.update({f"base_{k}": runs[0]["base"][k] for k in keys})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", nargs="+", default=None, help="defence names (default: all)")
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts (each sampled with 2 seeds)")
    args = parser.parse_args(argv)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() and args.only else {"defences": {}}
    strips = {}
    for name in args.only or DEFENCES:
        runs = []
        for seed in args.seeds:
            result, strip = run(name, seed, args.prompts)
            runs.append(result)
            strips.setdefault(name, strip)
        data["defences"][name] = {"config": DEFENCES[name][0], "overrides": DEFENCES[name][1], "runs": runs,
                                  **summary(runs)}
        s = data["defences"][name]
        print(f"{name}: ink {s['base_ink']:.3f} -> {s['ink']:.3f}, judge {s['base_judge']:.3f} -> {s['judge']:.3f}, "
              f"CLIP score {s['base_clipscore']:.1f} -> {s['clipscore']:.1f}, "
              f"diversity {s['base_diversity']:.3f} -> {s['diversity']:.3f}, distance {s['distance_to_base']:.3f}",
              flush=True)
    data.update(command="python -m benchmarks.hacking", seeds=args.seeds, prompts=args.prompts,
                threads=torch.get_num_threads())
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    if STRIPS.exists():
        strips = {**torch.load(STRIPS, weights_only=True), **strips}
    STRIPS.parent.mkdir(parents=True, exist_ok=True)
    torch.save(strips, STRIPS)
    draw({name: strips[name] for name in DEFENCES if name in strips}, GRID)


if __name__ == "__main__":
    main()
