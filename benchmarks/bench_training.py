"""Training throughput of nbhelpers.training.train, and a check that bf16/compile train like fp32.

Prints images/second of the real training loop (data indexing, loss, backward, Adam, EMA) for
EDM's CIFAR-10 DDPM++ network and for the companion configurations (SongUNet with 16/32/64
channels at 3x4x4, channel_mult [1], one block, no attention; the MLP), in fp32 eager, bf16
autocast and fp32 under torch.compile, with ratios against fp32 eager of the same run. Then trains
a tiny model for 50 steps in each mode with the same seed and compares the mean losses with the
seed-to-seed difference of fp32.

    python benchmarks/bench_training.py            # device auto (CUDA if present)
    python benchmarks/bench_training.py --quick    # companion sizes only, fewer steps
    python benchmarks/bench_training.py --full     # also bf16 for CIFAR-10 and compile on CPU

On CPU, compile is off unless --full or --compile (compiling takes minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbhelpers.devices import default_device  # noqa: E402
from nbhelpers.molrg import MoLRG  # noqa: E402
from nbhelpers.training import TrainConfig, train  # noqa: E402

COMPANION = dict(channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0)
MODES = {"fp32": dict(precision="fp32"), "bf16": dict(precision="bf16"), "compile": dict(compile=True)}


def companion_data(n: int = 256) -> torch.Tensor:
    """MoLRG samples as in the pilot: K = 2 subspaces of dimension 4 in 3x4x4 images."""
    x, _ = MoLRG.create(2, 4, 4, 3, generator=0).sample(n // 2, generator=1)
    return x


def companion_config(**kw) -> TrainConfig:
    base = dict(
        arch="ddpmpp",
        precond="edm",
        batch_size=64,
        total_steps=1,
        lr=2e-3,
        lr_rampup_kimg=0,
        ema_beta=0.999,
    )
    base.update(kw)
    return TrainConfig(**base)


def throughput(cfg: TrainConfig, data: torch.Tensor, device: torch.device, warmup: int, steps: int) -> float:
    """Images/second over ``steps`` steps after ``warmup`` steps (which absorb compilation)."""
    cfg = dataclasses.replace(cfg, total_steps=warmup + steps, log_every=warmup)
    hist = train(cfg, data, device=device, progress=False).history
    images = (hist[-1]["step"] - hist[0]["step"]) * cfg.batch_size
    return images / (hist[-1]["time_s"] - hist[0]["time_s"])


def measure(
    name: str, cfg: TrainConfig, mode: str, data: torch.Tensor, device: torch.device, warmup: int, steps: int
) -> float:
    """Throughput of ``cfg`` in ``mode``, printed as it comes; NaN (with the error printed) if it fails."""
    try:
        value = throughput(dataclasses.replace(cfg, **MODES[mode]), data, device, warmup, steps)
    except Exception as e:  # Report and go on: one broken mode should not hide the others.
        print(f"  {name:<28} {mode:<8} failed: {type(e).__name__}: {e}", flush=True)
        return math.nan
    print(f"  {name:<28} {mode:<8} {value:10.1f} img/s", flush=True)
    return value


def loss_curve(cfg: TrainConfig, data: torch.Tensor, device: torch.device, steps: int) -> list[float]:
    """Per-step training losses of the first ``steps`` steps."""
    cfg = dataclasses.replace(cfg, total_steps=steps, log_every=1)
    return [h["loss"] for h in train(cfg, data, device=device, progress=False).history]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA if available)")
    parser.add_argument("--quick", action="store_true", help="companion sizes only, fewer steps")
    parser.add_argument("--full", action="store_true", help="every mode for every network, also on CPU")
    parser.add_argument("--compile", action="store_true", help="include torch.compile on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default 1)")
    args = parser.parse_args()
    device = default_device(args.device)
    cuda = device.type == "cuda"
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)  # One thread per process used 2 shared cores best.
    use_compile = cuda or args.full or args.compile
    modes = [m for m in MODES if m != "compile" or use_compile]
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, modes {modes}")
    if not use_compile:
        print("torch.compile skipped on CPU (minutes of compilation); pass --compile or --full")
    print()

    # Throughput. Step counts are small on CPU, where bf16 autocast is slow without bf16 hardware.
    rows = []
    small = companion_data()
    mcs = (16,) if args.quick else (16, 32, 64)
    cases = [(f"SongUNet mc{mc} 3x4x4 b64", dict(network=dict(COMPANION, model_channels=mc))) for mc in mcs]
    cases.append(("MLP 3x4x4 b64", dict(arch="mlp", network={})))
    if cuda:
        plan = {"fp32": (5, 100), "bf16": (5, 100), "compile": (5, 100)}
    else:
        plan = {"fp32": (2, 8 if args.quick else 15), "bf16": (1, 2), "compile": (3, 15)}
    for name, kw in cases:
        cfg = companion_config(**kw)
        for mode in modes:
            rows.append((name, mode, measure(name, cfg, mode, small, device, *plan[mode])))
    if not args.quick:
        batch = 128 if cuda else 8
        cifar = torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        cfg = TrainConfig(arch="ddpmpp", precond="vp", batch_size=batch, total_steps=1, lr_rampup_kimg=0)
        name = f"CIFAR-10 DDPM++ 32x32 b{batch}"
        for mode in modes if (cuda or args.full) else ["fp32"]:
            rows.append((name, mode, measure(name, cfg, mode, cifar, device, *((5, 20) if cuda else (1, 1)))))

    print("\nthroughput (ratio vs fp32 eager of the same network, same run)")
    print(f"{'network':<28}{'mode':<10}{'img/s':>10}{'ratio':>8}")
    base = {n: v for n, m, v in rows if m == "fp32"}
    for n, m, v in rows:
        print(f"{n:<28}{m:<10}{v:>10.1f}{v / base[n]:>8.2f}")

    # Loss curves: same seed, tiny model.
    n_steps = 20 if args.quick else 50
    cfg = companion_config(network=dict(COMPANION, model_channels=16))
    curves = {}
    for mode in modes:
        try:
            curves[mode] = loss_curve(dataclasses.replace(cfg, **MODES[mode]), small, device, n_steps)
        except Exception as e:  # Report and go on: one broken mode should not hide the others.
            print(f"  {mode}: failed: {type(e).__name__}: {e}")
    other_seed = loss_curve(dataclasses.replace(cfg, seed=1), small, device, n_steps)
    ref = statistics.fmean(curves["fp32"])
    sem = statistics.stdev(curves["fp32"]) / math.sqrt(n_steps)
    noise = max(3 * sem, abs(statistics.fmean(other_seed) - ref))
    print(
        f"\nloss curves, first {n_steps} steps, SongUNet mc16 (fp32 mean {ref:.4f}; noise scale {noise:.4f} ="
    )
    print("max(3 x standard error, |fp32 seed 0 - seed 1|))")
    ok = len(curves) == len(modes)
    for mode, curve in curves.items():
        diff = statistics.fmean(curve) - ref
        good = abs(diff) <= noise and all(math.isfinite(v) for v in curve)
        ok &= good
        print(
            f"  {mode:<8} mean {statistics.fmean(curve):.4f}  diff {diff:+.4f}  "
            f"{'ok' if good else 'OUTSIDE NOISE'}"
        )
    print(f"  fp32 seed 1 mean {statistics.fmean(other_seed):.4f}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
