"""Benchmark: denoiser_jacobian vs torch.autograd.functional.jacobian on a small U-Net.

Both compute the full (n x n) Jacobian of a DDPM++ U-Net (EDM preconditioning, 3xRxR, n = 3R^2)
at a few noisy points with the same torch thread count. The reference is what the authors' code
does: ``torch.autograd.functional.jacobian`` with default settings (one backward pass per output)
at one point at a time. Prints the max abs difference and the speed ratio (target >= 5x), in wall
time and in process CPU time (steadier than wall time on a shared machine).

    .venv/bin/python benchmarks/bench_jacobian.py                      # 3x16x16, 32 channels
    .venv/bin/python benchmarks/bench_jacobian.py --resolution 8 --channels 16 --sweep
"""

from __future__ import annotations

import argparse
import time

import torch

from nbhelpers.jacobian import denoiser_jacobian
from nbhelpers.networks import make_network


def _timed(fn, repeats: int = 1):
    """(last result, best wall seconds, best CPU seconds) over ``repeats`` calls."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return out, wall, cpu


def reference_jacobian(net, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The authors' way: autograd.functional.jacobian at one point at a time, (B, n, n)."""
    n = x[0].numel()
    out = []
    for b in range(x.shape[0]):
        fn = lambda z, b=b: net(z, sigma[b : b + 1])
        out.append(torch.autograd.functional.jacobian(fn, x[b : b + 1]).reshape(n, n))
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=3, help="noisy points (batch)")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--channels", type=int, default=32, help="model_channels of the U-Net")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, same for both")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs for ours")
    parser.add_argument("--sweep", action="store_true", help="also time methods and chunk sizes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    net = make_network(
        "ddpmpp",
        "edm",
        args.resolution,
        3,
        model_channels=args.channels,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
    ).eval()
    with torch.no_grad():  # EDM zero-inits the output layers; randomise so the whole U-Net matters
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    shape = (args.points, 3, args.resolution, args.resolution)
    sigma = torch.logspace(-1, 0.5, args.points)
    noise = torch.randn(shape, generator=gen)
    x = 0.5 * torch.randn(shape, generator=gen) + sigma.reshape(-1, 1, 1, 1) * noise
    n = x[0].numel()
    params = sum(p.numel() for p in net.parameters())
    print(
        f"U-Net ddpmpp/edm 3x{args.resolution}x{args.resolution} (n = {n}), model_channels {args.channels}, "
        f"{params} parameters; {args.points} points; {torch.get_num_threads()} thread(s)"
    )

    denoiser_jacobian(net, x[:1], sigma[:1], chunk_size=8)  # warm up torch.func (one-time cost)
    ours, w_ours, c_ours = _timed(lambda: denoiser_jacobian(net, x, sigma), args.repeats)
    ref, w_ref, c_ref = _timed(lambda: reference_jacobian(net, x, sigma))
    diff = (ours - ref).abs().max().item()
    print(f"max |ours - reference| = {diff:.3e} (max |J| = {ref.abs().max().item():.3f})")
    print(f"ours (method auto, default chunk): wall {w_ours:.2f} s, CPU {c_ours:.2f} s")
    print(f"torch.autograd.functional.jacobian: wall {w_ref:.2f} s, CPU {c_ref:.2f} s")
    print(f"speed ratio: {w_ref / w_ours:.1f}x wall, {c_ref / c_ours:.1f}x CPU (target >= 5x)")

    if args.sweep:
        for method in ("vjp", "jvp"):
            for chunk in (1, 8, 32, 128, 512):
                run = lambda m=method, c=chunk: denoiser_jacobian(net, x, sigma, chunk_size=c, method=m)
                _, w, c = _timed(run, args.repeats)
                print(
                    f"  method={method} chunk_size={chunk:4d}: wall "
                    f"{w:.2f} s, CPU {c:.2f} s ({c_ref / c:.1f}x CPU)"
                )


if __name__ == "__main__":
    main()
