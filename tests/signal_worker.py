"""Run a small toy training that sends itself ``SIGNAL`` at ``POINT`` of iteration 1 (sampling, scoring, update)
or while checkpoint-2 is being written (``checkpoint``). Used by tests/test_signals.py.

    python tests/signal_worker.py OUTPUT_DIR POINT SIGNAL
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from test_signals import OVERRIDES  # noqa: E402

from flowalign.config import load_config  # noqa: E402
from flowalign.training import checkpoint as ckpt  # noqa: E402
from flowalign.training import make_trainer  # noqa: E402


def arm(trainer, point: str, signum: int) -> None:
    """Send ``signum`` to this process once, at ``point``."""
    sent = []

    def fire():
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signum)

    if point == "checkpoint":
        real_save = ckpt.torch.save

        def save(obj, path):  # the weights are written, the optimizer state and manifest not yet
            if Path(path).parent.name == ".tmp-checkpoint-2":
                fire()
            real_save(obj, path)
        ckpt.torch.save = save
        return
    name = {"sampling": "rollout", "scoring": "score", "update": "loss"}[point]
    real = getattr(trainer, name)

    def hooked(*args, **kwargs):
        batch_or_iteration = args[0]
        iteration = getattr(batch_or_iteration, "iteration", batch_or_iteration)
        if iteration == 1:
            fire()
        return real(*args, **kwargs)
    setattr(trainer, name, hooked)


def main(out: str, point: str, signame: str) -> None:
    trainer = make_trainer(load_config("configs/toy/digits_flow_grpo.yaml", [*OVERRIDES, f"output_dir={out}"]))
    arm(trainer, point, getattr(signal, signame))
    trainer.fit(progress=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
