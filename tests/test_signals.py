"""SIGINT and SIGKILL at each stage of an iteration (sampling, scoring, the update, a checkpoint being written):
the run resumed from its latest checkpoint ends with the uninterrupted run's weights, bit for bit. SIGINT lets
the iteration finish and checkpoints it (status 130); SIGKILL leaves the last complete checkpoint."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
OVERRIDES = ["train.prompts_per_iteration=2", "flow_grpo.group_size=4", "train.steps=4", "train.eval_prompts=0",
             "train.rollout_batch=8", "train.train_batch=8", "train.iterations=3", "train.checkpoint_every=1",
             "train.updates_per_iteration=2"]


def run(out: Path, resume: str | None = None) -> dict:
    from flowalign.config import load_config
    from flowalign.training import make_trainer
    from flowalign.training.lora import trainable_state

    trainer = make_trainer(load_config(REPO / "configs/toy/digits_flow_grpo.yaml", [*OVERRIDES, f"output_dir={out}"]))
    trainer.fit(resume=resume, progress=False)
    return trainable_state(trainer.gen.trainable_module, True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    return run(tmp_path_factory.mktemp("straight") / "run")


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("point", ["sampling", "scoring", "update", "checkpoint"])
def test_a_signal_at_any_stage_resumes_to_the_uninterrupted_run(tmp_path, uninterrupted, point, signame):
    from flowalign.training import checkpoint as ckpt

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "signal_worker.py"), str(out), point, signame],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == (130 if signame == "SIGINT" else -9), proc.stderr[-2000:]
    found = [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]
    if signame == "SIGINT":  # iteration 1 finished and was checkpointed; checkpoint-2 written whole
        waited = "checkpoint-2" if point == "checkpoint" else "iteration 1"
        assert f"finishing {waited} first" in proc.stdout and found[-1] == "checkpoint-2", (proc.stdout, found)
    else:  # killed: the newest complete checkpoint holds whole iterations only
        assert found[-1] == ("checkpoint-1"), found
    resumed = run(out, resume="latest")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
