"""Timing shared by the benchmarks: medians after a warm-up, two functions alternated."""
from __future__ import annotations

import statistics
import time


def time_side_by_side(a, b, repeats: int) -> tuple[float, float]:
    """Median wall times of ``a`` and ``b``, run alternately (so drifts in machine load hit both alike)."""
    a(), b()  # warm-up
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((a, times_a), (b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)
