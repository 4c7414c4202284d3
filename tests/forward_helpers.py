"""Shared checks of the forward-process method tests (not a pytest module)."""
from __future__ import annotations

import torch

from flowalign.training.lora import trainable_state


def largest_gradients_with_flat_rewards(trainer) -> tuple[list[float], dict]:
    """One iteration with every reward 0.5: the largest |gradient| at each optimizer step, and the metrics."""
    trainer.reward.parts["toy/bold_digit"]._score = lambda media, prompts, metadata: torch.full((len(prompts),), 0.5)
    grads, step = [], trainer.optimizer_step

    def record():
        grads.append(max(float(p.grad.abs().max()) for p in trainer.params if p.grad is not None))
        return step()
    trainer.optimizer_step = record
    metrics, _ = trainer.run_iteration(0)
    return grads, metrics


def assert_resume_is_bitwise(make, tmp_path, shadow: str) -> None:
    """4 iterations straight equal 2 + 2 resumed from the checkpoint: the LoRA and the method's ``shadow`` copy
    (old policy or EMA) bit for bit. ``make(folder, *overrides)`` builds a trainer."""
    def run(name, *plan):
        for iterations, resume in plan:
            tr = make(tmp_path / name, f"train.iterations={iterations}")
            tr.fit(resume=resume, progress=False)
            tr.save_checkpoint()
            tr.acc.end_training()
        return tr

    straight, split = run("straight", (4, None)), run("split", (2, None), (4, "latest"))
    a, b = (trainable_state(t.gen.trainable_module, True) for t in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    copies = [getattr(t.method, shadow).tensors for t in (straight, split)]
    assert all(torch.equal(x, y) for x, y in zip(*copies))
