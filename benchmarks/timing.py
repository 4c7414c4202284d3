"""Timing shared by the benchmarks: medians after a warm-up, two functions alternated."""
from __future__ import annotations

import statistics
import time


def _alternate(a, b, repeats: int) -> tuple[list[float], list[float]]:
    """Wall times of ``a`` and ``b`` run back to back ``repeats`` times after a warm-up (so drifts in machine
    load hit both alike)."""
    a(), b()  # warm-up
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((a, times_a), (b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return times_a, times_b


def time_side_by_side(a, b, repeats: int) -> tuple[float, float]:
    """Median wall times of ``a`` and ``b``, run alternately."""
    times_a, times_b = _alternate(a, b, repeats)
    return statistics.median(times_a), statistics.median(times_b)


def paired_ratio(a, b, repeats: int) -> dict:
    """``a``'s wall time over ``b``'s, measured back to back: the median of the per-pair ratios and their range
    (the noise a shared machine puts on the figure), and each side's median."""
    times_a, times_b = _alternate(a, b, repeats)
    ratios = [x / y for x, y in zip(times_a, times_b)]
    return {"ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "a_s": statistics.median(times_a), "b_s": statistics.median(times_b)}
