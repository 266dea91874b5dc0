"""Benchmark the empirical optimal denoiser against a plain reference and against one matmul.

Sizes: a batch of 64 queries, N = 4096 training points, D = 3 x 32 x 32, float32 data.

1. reference: materialises the (batch, n, D) differences chunk by chunk and makes two passes over
   the data, one for the softmax normaliser (max logit) and one for the weighted sum, as the
   authors' release does;
2. ``OptimalDenoiser`` (one pass, online log-sum-exp, matrix products);
3. a single float32 (64 x D) @ (D x N) matmul, the floor for any method that looks at every pair.

Prints best-of-repeats times, reference/ours (target >= 30) and ours/matmul (target <= 2.5), and
the largest difference between the two denoiser outputs. Run:
``.venv/bin/python benchmarks/bench_optimal.py [--device cpu] [--threads 1]``.
"""

from __future__ import annotations

import argparse

import torch
from _timing import add_common_arguments, best_time, setup

from nbhelpers.optimal import OptimalDenoiser


def reference_denoiser(x: torch.Tensor, train: torch.Tensor, sigma: float, chunk: int) -> torch.Tensor:
    """Two passes over ``train`` (N, C, H, W) with explicit (B, n, C, H, W) differences, float64 weights."""
    b, n = x.shape[0], train.shape[0]
    xb = x[:, None]

    def logits(y: torch.Tensor) -> torch.Tensor:
        return -((xb - y[None]) ** 2).reshape(b, y.shape[0], -1).sum(-1).double() / sigma**2 / 2

    bias = torch.full((b,), -torch.inf, dtype=torch.float64, device=x.device)
    for start in range(0, n, chunk):
        bias = torch.maximum(bias, logits(train[start : start + chunk]).max(1).values)
    den = torch.zeros(b, dtype=torch.float64, device=x.device)
    num = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for start in range(0, n, chunk):
        y = train[start : start + chunk]
        prob = torch.exp(logits(y) - bias[:, None])
        den += prob.sum(1)
        num += (prob[:, :, None, None, None] * y[None]).sum(1)
    return num / den[:, None, None, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=1024, help="OptimalDenoiser chunk size")
    parser.add_argument("--ref-chunk", type=int, default=128, help="reference chunk over N (memory bound)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ref-repeats", type=int, default=2)
    parser.add_argument(
        "--sigmas",
        type=lambda s: [float(v) for v in s.split(",")],
        default=[80.0, 2.0],
        help="noise levels; at 80 every weight is non-zero, at 2 one training point takes almost all",
    )
    args = parser.parse_args()

    device, sync, clock = setup(args)
    g = torch.Generator(device="cpu").manual_seed(0)
    train = (torch.rand(args.num_train, 3, 32, 32, generator=g) * 2 - 1).to(device)
    noise = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    x = train[: args.batch] + 2.0 * noise

    den = OptimalDenoiser(train, chunk_size=args.chunk, device=device)
    flat_x, flat_y = x.reshape(args.batch, -1), train.reshape(args.num_train, -1)
    t_mm = best_time(lambda: flat_x @ flat_y.T, args.repeats, sync, clock)
    # The reference's cost does not depend on sigma: one timed run per sigma, best of them.
    t_ref, rows = float("inf"), []
    for sigma in args.sigmas:
        t0 = clock()
        ref = reference_denoiser(x, train, sigma, args.ref_chunk)
        sync()
        t_ref = min(t_ref, clock() - t0)
        t_ours = best_time(lambda s=sigma: den(x, s), args.repeats, sync, clock)
        stats = den.posterior_stats(x, sigma)
        diff = (den(x, sigma).double() - ref).abs().max().item()
        rows.append((sigma, t_ours, stats.max_weight.min().item(), diff))

    print(
        f"device {device}, threads {torch.get_num_threads()}, "
        f"batch {args.batch}, N {args.num_train}, D {3 * 32 * 32}"
    )
    print(f"{args.clock} clock, best of {args.repeats} (reference: best of one run per sigma)")
    print(f"reference (two passes, explicit differences, chunk {args.ref_chunk}): {t_ref * 1e3:9.1f} ms")
    print(f"one float32 matmul (B x D) @ (D x N):                       {t_mm * 1e3:9.1f} ms")
    ok = True
    for sigma, t_ours, wmax, diff in rows:
        print(
            f"sigma {sigma:5g}: OptimalDenoiser {t_ours * 1e3:7.1f} "
            f"ms  reference/ours {t_ref / t_ours:6.1f}x "
            f"(target >= 30)  ours/matmul {t_ours / t_mm:5.2f}x (target <= 2.5)  "
            f"min max-weight {wmax:.3f}  max |ours - ref| {diff:.1e}"
        )
        ok &= diff < 1e-4
    if not ok:
        raise SystemExit("outputs disagree")


if __name__ == "__main__":
    main()
