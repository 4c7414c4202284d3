"""The toy config of each reward-hacking defence is the run its row of ``benchmarks.hacking`` measures (the
benchmark's overrides are the same settings), so the README's figures describe the shipped configs."""
from __future__ import annotations

import dataclasses

import pytest

from benchmarks.hacking import DEFENCES, QUIET
from flowalign.config import load_config

SHIPPED = {"configs/toy/digits_uncapped_flow_grpo.yaml": "Flow-GRPO, no defence",
           "configs/toy/digits_uncapped_kl.yaml": "KL to the base, beta 0.15",
           "configs/toy/digits_uncapped_ensemble.yaml": "ensemble of 4 classifier seeds, worst case",
           "configs/toy/digits_uncapped_gardo.yaml": "GARDO (beta 0.04)",
           "configs/toy/digits_uncapped_marble.yaml": "bold + CLIP score, MARBLE"}


@pytest.mark.parametrize("path, row", SHIPPED.items())
def test_each_defence_config_is_its_benchmark_row(tmp_path, path, row):
    config, overrides = DEFENCES[row]
    same = [*QUIET, f"output_dir={tmp_path}"]
    shipped = dataclasses.asdict(load_config(path, same))
    measured = dataclasses.asdict(load_config(config, [*overrides, *same]))
    assert shipped == measured
