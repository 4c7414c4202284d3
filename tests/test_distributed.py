"""Two CPU processes (torchrun + ``Accelerator(cpu=True)``: MULTI_CPU over gloo) against one process.

The worker (tests/dist_grpo_worker.py) runs each of its cases for two iterations and writes, per iteration
and rank, the gathered rewards and advantages (sorted by trajectory id), the gradient of every optimizer
update after DDP's all-reduce, and the rank's LoRA weights.

- Each trajectory's noise and prompt do not depend on the number of processes, so the gathered rewards
  and advantages match the single-process run.
- The gradients are compared, not only the weights: Adam's update ignores the gradient's scale, so a loss
  summed where it should be averaged over processes would pass a weights-only check. Cases cover
  shuffled minibatches, two updates per iteration with KL, GRPO-Guard, DanceGRPO, MixGRPO and Dr. GRPO.
  Trajectories run in different batch compositions, so fp32 rounding differs a little.
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
sys.path.insert(0, str(REPO / "tests"))
from dist_grpo_worker import CASES  # noqa: E402

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
          str(WORKER), str(out)])
    _run([sys.executable, str(WORKER), str(out)])
    return {(case, world, rank, i): torch.load(out / f"world{world}" / f"{case}_rank{rank}_iter{i}.pt")
            for case in CASES for world, ranks in ((1, [0]), (2, [0, 1])) for rank in ranks
            for i in range(ITERATIONS)}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_gather_what_one_process_sees(runs, case):
    for i in range(ITERATIONS):
        one = runs[case, 1, 0, i]
        assert torch.equal(one["ids"], torch.arange(8))
        for rank in (0, 1):
            two = runs[case, 2, rank, i]
            assert two["world"] == 2 and two["rank"] == rank
            assert torch.equal(two["ids"], one["ids"])
            assert torch.allclose(two["rewards"], one["rewards"], rtol=1e-4, atol=1e-5), i
            assert torch.allclose(two["advantages"], one["advantages"], rtol=1e-4, atol=1e-4), i
    assert runs[case, 1, 0, 0]["advantages"].abs().sum() > 0  # a real signal, not all-zero advantages


@pytest.mark.parametrize("case", list(CASES))
def test_every_update_has_the_single_process_gradient(runs, case):
    """The same gradient, scale included, for every optimizer update of every iteration."""
    for i in range(ITERATIONS):
        one = runs[case, 1, 0, i]["grads"]
        for rank in (0, 1):
            two = runs[case, 2, rank, i]["grads"]
            assert len(two) == len(one) > 0
            for update, (g1, g2) in enumerate(zip(one, two)):
                assert g1.norm() > 0, (case, i, update)
                assert (g2 - g1).norm() <= 1e-3 * g1.norm(), (case, i, update, (g2 - g1).norm() / g1.norm())


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_hold_identical_lora_weights(runs, case):
    for i in range(ITERATIONS):
        a, b = runs[case, 2, 0, i]["lora"], runs[case, 2, 1, i]["lora"]
        assert a.keys() == b.keys() and len(a) > 0
        assert all(torch.equal(a[k], b[k]) for k in a), f"ranks diverged at iteration {i}"
        # rewards and advantages were gathered: every rank saw the same full vectors
        assert torch.equal(runs[case, 2, 0, i]["rewards"], runs[case, 2, 1, i]["rewards"])
        assert torch.equal(runs[case, 2, 0, i]["advantages"], runs[case, 2, 1, i]["advantages"])
        one = runs[case, 1, 0, i]["lora"]  # and the single process's, up to fp32 rounding
        assert all(torch.allclose(a[k], one[k], rtol=1e-3, atol=1e-4) for k in one)
    before, after = runs[case, 2, 0, 0]["lora"], runs[case, 2, 0, ITERATIONS - 1]["lora"]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # training moved the weights
