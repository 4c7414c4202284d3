"""Two CPU processes (torchrun + ``Accelerator(cpu=True)``: MULTI_CPU over gloo) against one process.

The worker (tests/dist_grpo_worker.py) runs a tiny GRPO run and writes, after every iteration and per rank,
the gathered rewards and advantages (sorted by trajectory id) and the rank's LoRA weights.

- Each trajectory's noise and prompt do not depend on the number of processes, so the gathered rewards
  and advantages match the single-process run. ``shuffle=false`` and one optimizer update per iteration
  make the update itself world-independent too (the gradient is the mean over all transitions either
  way); with shuffling or several updates the minibatches depend on how trajectories are spread, so only
  iteration 0 would match. Trajectories run in different batch compositions: fp32 rounding differs a bit.
- DDP keeps the ranks' LoRA weights exactly equal after every iteration.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "dist_grpo_worker.py"
ITERATIONS = 2
OVERRIDES = ["flow_grpo.shuffle=false", "train.updates_per_iteration=1", f"train.iterations={ITERATIONS}"]

pytestmark = [pytest.mark.slow,  # process launches: the full suite only
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="torch.distributed with gloo is needed")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    _run([*launcher, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
          str(WORKER), str(out), *OVERRIDES])
    _run([sys.executable, str(WORKER), str(out), *OVERRIDES])
    return {(world, rank, i): torch.load(out / f"world{world}" / f"rank{rank}_iter{i}.pt")
            for world, ranks in ((1, [0]), (2, [0, 1])) for rank in ranks for i in range(ITERATIONS)}


def test_two_processes_gather_what_one_process_sees(runs):
    for i in range(ITERATIONS):
        one = runs[1, 0, i]
        assert torch.equal(one["ids"], torch.arange(8))
        for rank in (0, 1):
            two = runs[2, rank, i]
            assert two["world"] == 2 and two["rank"] == rank
            assert torch.equal(two["ids"], one["ids"])
            assert torch.allclose(two["rewards"], one["rewards"], rtol=1e-4, atol=1e-5), i
            assert torch.allclose(two["advantages"], one["advantages"], rtol=1e-4, atol=1e-4), i
            # and the update the rewards of the next iteration come from (up to fp32 rounding)
            assert all(torch.allclose(two["lora"][k], one["lora"][k], rtol=1e-3, atol=1e-4) for k in one["lora"])
    assert runs[1, 0, 0]["advantages"].abs().sum() > 0  # a real signal, not all-zero advantages


def test_ranks_hold_identical_lora_weights(runs):
    for i in range(ITERATIONS):
        a, b = runs[2, 0, i]["lora"], runs[2, 1, i]["lora"]
        assert a.keys() == b.keys() and len(a) > 0
        assert all(torch.equal(a[k], b[k]) for k in a), f"ranks diverged at iteration {i}"
        # rewards and advantages were gathered: every rank saw the same full vectors
        assert torch.equal(runs[2, 0, i]["rewards"], runs[2, 1, i]["rewards"])
        assert torch.equal(runs[2, 0, i]["advantages"], runs[2, 1, i]["advantages"])
    before = runs[2, 0, 0]["lora"]
    after = runs[2, 0, ITERATIONS - 1]["lora"]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # training moved the weights
