"""Benchmark chunked max-similarity search (the generalization score's core) for time and memory.

1. At a size where the full similarity matrix fits (default 10,000 x 5,000 x 512), time
   ``max_similarity`` against a naive reference that builds the whole (Nq, Nk) matrix at once, and
   check that both give the same maxima and indices.
2. At full size (default 50,000 queries x 10,000 keys x 512, a 2 GB similarity matrix if built at
   once), run ``max_similarity`` in a fresh subprocess and report its peak resident memory
   (``ru_maxrss``, which sees torch's allocations), which must stay under 2 GiB (on CUDA: the
   GPU memory torch allocated, since host RSS then also counts the CUDA runtime).

Run: ``.venv/bin/python benchmarks/bench_scores.py [--device cpu] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F
from _timing import add_common_arguments, best_time, setup

from nbhelpers.scores import max_similarity

CHILD = """
import json, resource, sys, time, torch
from nbhelpers.scores import max_similarity
nq, nk, dim, chunk, threads, device = json.loads(sys.argv[1])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
q = torch.randn(nq, dim, generator=g)
k = torch.randn(nk, dim, generator=g)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0, c0 = time.perf_counter(), time.process_time()
values, idx = max_similarity(q, k, chunk_size=chunk, device=device)
if device.startswith("cuda"):
    torch.cuda.synchronize()
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
res = {"base_mib": base / 1024, "peak_mib": peak / 1024, "gpu_peak_mib": gpu}
res.update(seconds=seconds, cpu_seconds=cpu)
print(json.dumps(res))
"""


def naive_max_similarity(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole (Nq, Nk) cosine matrix at once, then its row maxima."""
    return (F.normalize(q, dim=1) @ F.normalize(k, dim=1).T).max(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=4096, help="rows per chunk, for queries and keys")
    parser.add_argument("--small", type=int, nargs=2, default=[10_000, 5_000], metavar=("NQ", "NK"))
    parser.add_argument("--full", type=int, nargs=2, default=[50_000, 10_000], metavar=("NQ", "NK"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device, sync, clock = setup(args)
    g = torch.Generator().manual_seed(0)
    nq, nk = args.small
    q = torch.randn(nq, args.dim, generator=g).to(device)
    k = torch.randn(nk, args.dim, generator=g).to(device)

    t_chunked = best_time(
        lambda: max_similarity(q, k, chunk_size=args.chunk, device=device), args.repeats, sync, clock
    )
    t_naive = best_time(lambda: naive_max_similarity(q, k), args.repeats, sync, clock)
    values, idx = max_similarity(q, k, chunk_size=args.chunk, device=device)
    ref_values, ref_idx = naive_max_similarity(q, k)
    diff = (values - ref_values.cpu()).abs().max().item()
    same_idx = (idx == ref_idx.cpu()).double().mean().item()

    print(
        f"device {device}, threads {torch.get_num_threads()}, "
        f"dim {args.dim}, chunk {args.chunk}, {args.clock} clock"
    )
    print(f"{nq} x {nk}: chunked {t_chunked * 1e3:8.1f} ms, naive full matrix {t_naive * 1e3:8.1f} ms")
    print(
        f"  chunked / naive = {t_chunked / t_naive:.2f}x, max |diff| {diff:.1e}, same argmax {same_idx:.4f}"
    )

    nq, nk = args.full
    spec = json.dumps([nq, nk, args.dim, args.chunk, args.threads, str(device)])
    out = subprocess.run([sys.executable, "-c", CHILD, spec], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"full-size run failed:\n{out.stderr}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    naive_gib = nq * nk * 4 / 2**30
    print(
        f"{nq} x {nk}: chunked {res['seconds']:.1f} s wall, {res['cpu_seconds']:.1f} s CPU; peak RSS "
        f"{res['peak_mib']:.0f} MiB "
        f"(data and torch before the search {res['base_mib']:.0f} MiB; a full similarity matrix alone "
        f"would be {naive_gib:.1f} GiB); limit 2048 MiB"
    )
    if (
        res["gpu_peak_mib"] is not None
    ):  # host RSS then includes the CUDA runtime; the search lives on the GPU
        print(f"  peak GPU memory allocated by torch {res['gpu_peak_mib']:.0f} MiB; limit 2048 MiB")
        if res["gpu_peak_mib"] >= 2048:
            raise SystemExit("peak GPU memory over 2 GiB")
    elif res["peak_mib"] >= 2048:
        raise SystemExit("peak memory over 2 GiB")
    if not (diff < 1e-5 and same_idx > 0.999):
        raise SystemExit("chunked and naive results disagree")


if __name__ == "__main__":
    main()
