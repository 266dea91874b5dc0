"""Timing helper shared by the benchmark scripts (run as ``python benchmarks/bench_*.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_time(
    fn: Callable[[], object], repeats: int, sync: Callable[[], object], clock=time.perf_counter
) -> float:
    """Best time of ``repeats`` calls (after one warm-up call), read from ``clock``, in seconds."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        sync()
        best = min(best, clock() - t0)
    return best
