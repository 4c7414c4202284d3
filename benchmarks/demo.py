"""What ``make demo`` prints: the demo's own run (``flowalign train configs/toy/digits_flow_grpo.yaml
monitor.every=10``, the hacking monitor on), its
``report/metrics.json`` kept as ``benchmarks/results/demo.json`` (the history left out).  Run:
``python -m benchmarks.demo``."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = "configs/toy/digits_flow_grpo.yaml"
OVERRIDES = ["monitor.every=10"]  # as the Makefile's demo target


def main() -> dict:
    from flowalign.config import load_config
    from flowalign.training.run import train

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        metrics = train(CONFIG, [*OVERRIDES, f"output_dir={tmp}"], progress=False, print_fn=lines.append)
        report = json.loads((Path(tmp) / "report" / "metrics.json").read_text())
    result = {"command": "python -m benchmarks.demo", "config": CONFIG, "overrides": OVERRIDES,
              "threads": torch.get_num_threads(),
              "eval_prompts": load_config(CONFIG).train.eval_prompts,
              **{k: v for k, v in report.items() if k not in ("history", "final")},
              "iterations": len(metrics["history"]),
              "monitor_line": next(line for line in lines if line.startswith("monitor: "))}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
