"""The prepared GPU check (benchmarks/gpu_check.py) runs end to end on a tiny SD3 in bf16 on the CPU, so the first
GPU that becomes available measures the real thing instead of finding a bug. (In its own process: accelerate's
state is one per process and the suite's other trainers set it differently.)"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_check_runs_on_a_tiny_sd3_in_bf16(tmp_path):
    from benchmarks.gpu_check import METHODS

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--tiny", "--bf16", "--iterations", "1",
                           "--steps", "3", "--out", str(tmp_path / "check.json")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "check.json").read_text())
    assert set(result["methods"]) == set(METHODS)
    for name, row in result["methods"].items():
        assert row["s_per_iteration"] > 0 and row["samples_per_iteration"] > 0, name
        # bf16 against fp32 on the same transitions: a real, small difference
        assert math.isfinite(row["logp_max_abs_error"]) and 0 < row["logp_max_abs_error"] < 0.5, (name, row)
