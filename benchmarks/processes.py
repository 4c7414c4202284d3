"""Samples per second of every method on 1 and on 2 CPU processes (torchrun, gloo; one thread per process), on the
toy digits model. Run: ``python -m benchmarks.processes``.

Each method's toy config at the same size (4 prompts per iteration, 8 steps); a warm-up iteration, then the median
of ``--iterations`` iterations (sampling, scoring, advantages, updates). With one thread per process the 2-process
figure shows how the work per process shrinks as processes are added (ideal: 2x).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SIZE = ["train.prompts_per_iteration=4", "train.steps=8", "train.eval_prompts=0", "train.checkpoint_every=0",
        "train.updates_per_iteration=1"]
METHODS = {"Flow-GRPO": ("configs/toy/digits_flow_grpo.yaml", []),
           "DanceGRPO": ("configs/toy/digits_dance_grpo.yaml", []),
           "MixGRPO": ("configs/toy/digits_mix_grpo.yaml", []),
           "TempFlow-GRPO": ("configs/toy/digits_tempflow_grpo.yaml", []),
           "G2RPO": ("configs/toy/digits_g2rpo.yaml", []),
           "Dynamic-TreeRPO": ("configs/toy/digits_tree_grpo.yaml", []),
           "Dr. GRPO": ("configs/toy/digits_dr_grpo.yaml", []),
           "Pref-GRPO": ("configs/toy/digits_pref_grpo.yaml", []),
           "AC-Flow": ("configs/toy/digits_ac_flow.yaml", ["ac_flow.critic_warmup=0"]),
           "ORW-CFM-W2": ("configs/toy/digits_orw_cfm_w2.yaml", []),
           "DRAGON": ("configs/toy/digits_dragon.yaml", [])}


def worker(out: Path, iterations: int) -> None:
    """Under torchrun (or alone): time every method; the main process writes ``out``."""
    import torch
    from accelerate import Accelerator

    from flowalign.config import load_config
    from flowalign.training import make_trainer

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    result = {}
    for name, (config, extra) in METHODS.items():
        cfg = load_config(ROOT / config, [*SIZE, f"train.iterations={iterations + 1}",
                                          f"output_dir=/tmp/flowalign_processes/{acc.num_processes}/{name}", *extra])
        trainer = make_trainer(cfg, accelerator=acc)
        times, samples = [], 0
        for i in range(iterations + 1):
            acc.wait_for_everyone()
            start = time.perf_counter()
            _, batch = trainer.run_iteration(i)
            acc.wait_for_everyone()
            times.append(time.perf_counter() - start)
            samples = int(acc.gather(torch.tensor([batch.leaves.shape[0]])).sum())
        seconds = statistics.median(times[1:])
        result[name] = {"samples_per_iteration": samples, "s_per_iteration": seconds,
                        "samples_per_s": samples / seconds}
    if acc.is_main_process:
        out.write_text(json.dumps(result, indent=2))
    acc.end_training()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, out: Path, iterations: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    launcher = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(processes), "--master_addr",
                "127.0.0.1", "--master_port", str(_free_port())] if processes > 1 else [sys.executable]
    subprocess.run([*launcher, str(Path(__file__)), "--worker", str(out), "--iterations", str(iterations)],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "processes.json"))
    args = parser.parse_args(argv)
    if args.worker:
        worker(Path(args.worker), args.iterations)
        return {}
    runs = {n: launch(n, Path(f"/tmp/flowalign_processes_{n}.json"), args.iterations) for n in (1, 2)}
    result = {"iterations": args.iterations, "threads_per_process": 1, "size": SIZE, "methods": {
        name: {"samples_per_iteration": runs[1][name]["samples_per_iteration"],
               "samples_per_s_1": runs[1][name]["samples_per_s"], "samples_per_s_2": runs[2][name]["samples_per_s"],
               "speedup": runs[2][name]["samples_per_s"] / runs[1][name]["samples_per_s"]} for name in METHODS},
        "command": "python -m benchmarks.processes"}
    print(f"{'method':<18}{'samples/it':>11}{'1 process':>12}{'2 processes':>13}{'speedup':>9}")
    for name, row in result["methods"].items():
        print(f"{name:<18}{row['samples_per_iteration']:>11}{row['samples_per_s_1']:>12.1f}"
              f"{row['samples_per_s_2']:>13.1f}{row['speedup']:>8.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
