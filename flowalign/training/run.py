"""``flowalign train``: build the trainer from a config, evaluate before, train, evaluate after, report."""
from __future__ import annotations

from pathlib import Path

from ..config import RunConfig, load_config
from . import make_trainer
from .report import evaluate_policy, heldout_prompts, write_report


def train(config: str | Path | RunConfig | None = None, overrides: list[str] = (), resume: str | None = None,
          progress: bool = True, print_fn=print) -> dict:
    """Run a training job (any registered method); returns the report's metrics (reward before/after, history,
    paths)."""
    cfg = config if isinstance(config, RunConfig) else load_config(config, list(overrides))
    trainer = make_trainer(cfg)
    t = trainer.t
    prompts, meta = heldout_prompts(t.eval_prompts, trainer.file_prompts, trainer.world)
    before = evaluate_policy(trainer.gen, trainer.reward, prompts, meta, t.eval_steps, t.guidance) if prompts else None
    history = trainer.fit(resume=resume, progress=progress)
    final = trainer.save_final()
    metrics = {"final": str(final)}
    if trainer.acc.is_main_process and before is not None:
        after = evaluate_policy(trainer.gen, trainer.reward, prompts, meta, t.eval_steps, t.guidance)
        metrics = write_report(Path(cfg.output_dir), before, after, history,
                               {"final": str(final), "method": cfg.method},
                               getattr(trainer.gen, "sample_rate", None))
        print_fn(f"reward on {len(prompts)} held-out prompts and seeds: {metrics['reward_before']:.4f} -> "
                 f"{metrics['reward_after']:.4f}; report in {Path(cfg.output_dir) / 'report'}, LoRA in {final}")
    trainer.acc.end_training()
    return metrics
