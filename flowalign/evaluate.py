"""``flowalign evaluate``: generate samples for a prompt set and score them with chosen rewards."""
from __future__ import annotations

import json
from pathlib import Path

from . import rewards as reward_lib
from .config import ConfigError, RunConfig
from .generators import load_generator
from .inference import generate, save_grid
from .prompt_sets import read_prompt_set

#: Samples one evaluation generates at most (they are all held in memory to be scored).
MAX_EVAL_SAMPLES = 100_000


def eval_prompts(cfg: RunConfig) -> tuple[list[str], list[dict]]:
    """The prompt set of ``cfg.eval`` (explicit, file and toy prompts together), with per-prompt metadata."""
    from .toy.prompts import sample_prompts

    prompts, meta = list(cfg.eval.prompts), [{} for _ in cfg.eval.prompts]
    if cfg.eval.prompt_file:
        rows = read_prompt_set(cfg.eval.prompt_file, "eval.prompt_file")
        prompts += rows.prompts
        meta += rows.metadata
    if cfg.eval.toy_prompts:
        toy, digits = sample_prompts(cfg.eval.toy_prompts, seed=cfg.sample.seed)
        prompts += toy
        meta += [{"digit": d} for d in digits]
    if not prompts:
        raise ConfigError("eval: no prompts (set eval.prompts, eval.prompt_file or eval.toy_prompts)")
    k = cfg.eval.samples_per_prompt
    if len(prompts) * k > MAX_EVAL_SAMPLES:
        raise ConfigError(f"eval: {len(prompts)} prompts x eval.samples_per_prompt {k} = {len(prompts) * k} samples, "
                          f"over the cap of {MAX_EVAL_SAMPLES}")
    return [p for p in prompts for _ in range(k)], [m for m in meta for _ in range(k)]

def evaluate(cfg: RunConfig, print_fn=print) -> dict:
    """Generate, score, write ``samples.png`` and ``eval.json`` to ``cfg.output_dir``, print a table."""
    from .checks import check_output_dir

    check_output_dir(cfg.output_dir)
    prompts, meta = eval_prompts(cfg)
    scorers = {name: reward_lib.load(name) for name in cfg.eval.rewards}
    generator = load_generator(cfg.model.name, cfg.model.dtype, local_files_only=cfg.model.local_files_only,
                               **cfg.model.options)
    media = generate(generator, prompts, steps=cfg.sample.steps, guidance=cfg.sample.guidance, seed=cfg.sample.seed,
                     negative_prompt=cfg.sample.negative_prompt, batch_size=cfg.sample.batch_size, metadata=meta)
    results = {}
    for name, scorer in scorers.items():
        scorer.to(generator.device)
        scores = scorer.score(media, prompts, meta)
        results[name] = {"mean": scores.mean().item(), "std": scores.std().item() if len(scores) > 1 else 0.0,
                         "n": len(scores)}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.eval.grid_size:
        save_grid(media[: cfg.eval.grid_size], out / "samples.png")
    summary = {"model": cfg.model.name, "steps": cfg.sample.steps, "guidance": cfg.sample.guidance,
               "seed": cfg.sample.seed, "samples": len(prompts), "rewards": results}
    (out / "eval.json").write_text(json.dumps(summary, indent=2))
    print_fn(format_table(summary))
    return summary

def format_table(summary: dict) -> str:
    rows = [f"{summary['model']}: {summary['samples']} samples, {summary['steps']} steps, "
            f"guidance {summary['guidance']}, seed {summary['seed']}",
            f"{'reward':<20}{'mean':>10}{'std':>10}"]
    rows += [f"{name:<20}{r['mean']:>10.4f}{r['std']:>10.4f}" for name, r in summary["rewards"].items()]
    return "\n".join(rows)

__all__ = ["evaluate", "eval_prompts", "format_table"]
