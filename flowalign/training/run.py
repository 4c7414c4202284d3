"""``flowalign train``: build the trainer from a config, evaluate before, train, evaluate after, report."""
from __future__ import annotations

from pathlib import Path

import yaml

from ..config import RunConfig, config_dict, load_config
from ..errors import FlowalignError
from ..sharing import check_push, facts_of, share, write_model_card
from . import make_trainer
from .monitor import monitor_summary
from .report import evaluate_policy, heldout_prompts, write_report
from .scoring import GuardedEvaluation
from .trackers import log_report


def train(config: str | Path | RunConfig | None = None, overrides: list[str] = (), resume: str | None = None,
          progress: bool = True, print_fn=print) -> dict:
    """Run a training job (any registered method); returns the report's metrics (reward before/after, history,
    paths)."""
    cfg = config if isinstance(config, RunConfig) else load_config(config, list(overrides))
    if cfg.train.hub_model_id:
        check_push(cfg.train.hub_model_id, "train.hub_model_id")  # before anything loads
    trainer = make_trainer(cfg)
    if trainer.acc.is_main_process:  # what the run was, readable and loadable again (flowalign train config.yaml)
        (Path(cfg.output_dir) / "config.yaml").write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))
    try:
        return _train_and_report(trainer, cfg, resume, progress, print_fn)
    finally:  # the trackers flush and close even when training stops on an error
        trainer.acc.end_training()


def _train_and_report(trainer, cfg: RunConfig, resume: str | None, progress: bool, print_fn) -> dict:
    """Evaluate before, train, save the final weights, evaluate after, write the report (and send its figures to
    the trackers)."""
    t = trainer.t
    prompts, meta = heldout_prompts(t.eval_prompts, trainer.heldout_file, trainer.world)
    evaluation = lambda label: evaluate_policy(trainer.gen, GuardedEvaluation(trainer, label), prompts, meta,  # noqa: E731
                                               t.eval_steps, t.guidance)
    before = evaluation("the evaluation before training") if prompts else None
    history = trainer.fit(resume=resume, progress=progress)
    try:
        final = trainer.save_final()
        metrics = {"final": str(final)}
        if trainer.acc.is_main_process and before is not None:
            metrics = write_report(Path(cfg.output_dir), before, evaluation("the evaluation after training"),
                                   history, {"final": str(final), "method": cfg.method,
                                             **({"monitor": trainer.monitor.state()} if trainer.monitor else {})},
                                   getattr(trainer.gen, "sample_rate", None))
            log_report(trainer.acc, Path(cfg.output_dir) / "report", trainer.iteration)
            print_fn(f"reward on {len(prompts)} held-out prompts and seeds: {metrics['reward_before']:.4f} -> "
                     f"{metrics['reward_after']:.4f}{_skipped(metrics)}; report in "
                     f"{Path(cfg.output_dir) / 'report'}, LoRA in {final}")
            if trainer.monitor is not None:
                print_fn(monitor_summary(trainer.monitor.first, history, trainer.monitor.alarm))
        if trainer.acc.is_main_process and trainer.lora:
            card = write_model_card(cfg.output_dir, facts_of(cfg, trainer.gen.lora_format, metrics),
                                    cfg.train.hub_model_id)
            if cfg.train.hub_model_id:
                print_fn(f"pushed {final} with its model card to {share(cfg.output_dir, cfg.train.hub_model_id)}")
            else:
                print_fn(f"model card in {card} (share it: flowalign share {cfg.output_dir} --push-to-hub OWNER/NAME)")
    except OSError as err:
        raise FlowalignError(f"could not write {err.filename or cfg.output_dir}: {err.strerror or err} (the "
                             f"checkpoints under {trainer.out / 'checkpoints'} are intact)") from None
    return metrics


def _skipped(metrics: dict) -> str:
    """`` (n samples skipped)`` when a failing reward skipped some held-out samples."""
    n = metrics["reward_before_skipped"] + metrics["reward_after_skipped"]
    return f" ({n} held-out samples skipped: their reward failed)" if n else ""
