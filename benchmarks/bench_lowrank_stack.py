"""Speed of the low-rank fits of ``molrg_phase_transition`` panel (a): M fits trained one by one (the
plain reference: one ``training.train`` run per fit) against one ``molrg.LowRankStack`` holding all M,
and the MoLRG posterior mean by two matrix products against a per-class einsum reference.

    python benchmarks/bench_lowrank_stack.py            # M = 32 fits of 500 steps at n = 192, d = 8
    python benchmarks/bench_lowrank_stack.py --quick    # fewer steps

Prints seconds per fit for both ways and their ratio, and the largest difference between the two
posterior means (float64).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import add_common_arguments, best_time, setup  # noqa: E402

from nbhelpers.experiments import cells  # noqa: E402
from nbhelpers.molrg import LowRankDenoiser, LowRankStack, MoLRG, posterior_mean  # noqa: E402


def einsum_posterior_mean(x: torch.Tensor, bases: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Reference: the same posterior mean with one einsum per term, for one mixture (K, n, d)."""
    coef = torch.einsum("knd,bn->bkd", bases, x)
    weights = torch.softmax(coef.square().sum(-1) / (2 * sigma.square() * (1 + sigma.square())), dim=1)
    proj = torch.einsum("knd,bkd->bkn", bases, coef)
    return torch.einsum("bk,bkn->bn", weights, proj) / (1 + sigma.square())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--fits", type=int, default=32, help="M: fits per grid point (trials x restarts)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="100 steps, 8 fits")
    args = parser.parse_args()
    device, sync, clock = setup(args)
    fits, steps = (8, 100) if args.quick else (args.fits, args.steps)
    K, d, res, per_class = 2, 8, 8, 32
    mix = MoLRG.create(K, d, res, 3, generator=0)
    xs = [mix.sample(per_class, generator=i)[0] for i in range(fits)]
    nets = [LowRankDenoiser(K, d, res, 3, generator=i) for i in range(fits)]
    section = {"total_steps": steps, "lr": 0.05, "lr_rampup_kimg": 0, "ema_beta": 0.95, "loss": "ve"}
    train = cells.train_config("lowrank", "edm", {}, section, batch_size=64)

    def one_by_one() -> None:
        for x, net in zip(xs, nets):
            cells.train_model(train, x, device, net=net)

    def stacked() -> None:
        cells.train_stacked(train, xs, nets, device)

    print(
        f"{fits} low-rank fits, K = {K}, d = {d}, n = {3 * res * res}, {steps} steps of 64, device {device}"
    )
    ref = best_time(one_by_one, 1, sync, clock) / fits
    new = best_time(stacked, 2, sync, clock) / fits
    print(f"  one run per fit   {ref * 1000:9.1f} ms per fit")
    print(f"  one stack         {new * 1000:9.1f} ms per fit   ratio {ref / new:6.1f}x")

    x = torch.randn(4096, 3 * res * res, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = torch.rand(4096, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.05
    bases = mix.bases.to(torch.float64)
    diff = float((posterior_mean(x, bases, sigma) - einsum_posterior_mean(x, bases, sigma)).abs().max())
    t_ref = best_time(lambda: einsum_posterior_mean(x, bases, sigma), 5, sync, clock)
    t_new = best_time(lambda: posterior_mean(x, bases, sigma), 5, sync, clock)
    print(f"posterior mean of 4096 points: einsum {t_ref * 1000:.2f} ms, two products {t_new * 1000:.2f} ms")
    print(f"  ratio {t_ref / t_new:.1f}x, largest difference {diff:.1e}")
    stack = LowRankStack(nets)
    assert len(stack.members()) == fits


if __name__ == "__main__":
    main()
