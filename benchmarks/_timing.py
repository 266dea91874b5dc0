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


def add_common_arguments(parser) -> None:
    """``--device``, ``--clock`` and ``--threads``, the options every benchmark shares."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (steadier on a shared machine, one thread)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for every method")


def setup(args):
    """Apply ``--threads``; return (device, sync, clock) for :func:`best_time`."""
    import torch

    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return device, sync, clock
