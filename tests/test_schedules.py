"""nbhelpers.schedules: EDM's ablation sampler (discretisation, schedule, scaling, solver)."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import torch

from nbhelpers import schedules
from nbhelpers.sampling import SeedNoise, edm_sampler, generate


class Gaussian(torch.nn.Module):
    """Exact denoiser of N(0, sd^2 I): D(x; sigma) = sd^2 / (sd^2 + sigma^2) x, on 3 x 4 x 4 images."""

    sigma_min, sigma_max, img_channels, img_resolution, label_dim = 0.002, 80.0, 3, 4, 0

    def __init__(self, sd: float = 1.0):
        super().__init__()
        self.sd = sd

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return x * self.sd**2 / (self.sd**2 + sigma**2)


def latents(n=5):
    return SeedNoise(range(n)).randn((3, 4, 4))


def test_edm_choices_reproduce_edm_sampler():
    net, z = Gaussian(0.5), latents()
    for steps, solver, order in [(18, "heun", 2), (7, "euler", 1)]:
        ours = schedules.ablation_sampler(net, z, num_steps=steps, solver=solver)
        assert torch.allclose(ours, edm_sampler(net, z, num_steps=steps, order=order), rtol=1e-12, atol=1e-12)
    churn = dict(S_churn=20.0, S_min=0.05, S_max=50.0, S_noise=1.003)
    ours = schedules.ablation_sampler(net, z, num_steps=10, noise=SeedNoise(range(5)), **churn)
    ref = edm_sampler(net, z, num_steps=10, noise=SeedNoise(range(5)), **churn)
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "disc,sched,scaling",
    list(itertools.product(schedules.DISCRETIZATIONS, schedules.SCHEDULES, schedules.SCALINGS)),
)
def test_every_choice_solves_the_same_ode(disc, sched, scaling):
    """Same ODE in other coordinates: with many steps every choice ends at the exact solution
    x0 = x_T sd / sqrt(sd^2 + sigma_0^2) of Gaussian data (x_T = sigma_0 eps, sigma_0 the first level);
    what is left is the last Euler step from sigma_min to 0 and, for iDDPM, its coarse levels."""
    net, z = Gaussian(0.5), latents()
    x = schedules.ablation_sampler(
        net, z, num_steps=512, discretization=disc, schedule_name=sched, scaling=scaling
    )
    lo, hi = schedules.default_sigma_range(disc)
    sigma0 = float(schedules.sigma_steps(disc, 512, max(lo, 0.002), min(hi, 80.0))[0])
    exact = z.double() * 0.5 * sigma0 / math.sqrt(0.25 + sigma0**2)
    assert float(((x - exact).abs() / exact.abs()).max()) < 2e-2


def test_discretisations_follow_their_formulas():
    vp = schedules.sigma_steps("vp", 10, 0.002, 80.0)
    assert vp[0] == pytest.approx(80.0, rel=1e-9) and vp[-1] == pytest.approx(0.002, rel=1e-9)
    ve = schedules.sigma_steps("ve", 10, 0.02, 100.0)
    assert torch.allclose(ve[1:] / ve[:-1], (ve[1] / ve[0]).expand(9)) and ve[0] == pytest.approx(100.0)
    edm = schedules.sigma_steps("edm", 10, 0.002, 80.0, rho=7)
    assert torch.allclose(
        edm ** (1 / 7), torch.linspace(80 ** (1 / 7), 0.002 ** (1 / 7), 10, dtype=torch.float64)
    )
    assert schedules.default_sigma_range("vp") == pytest.approx(
        (schedules.vp_sigma(1e-3), schedules.vp_sigma(1.0))
    )
    for name in schedules.SCHEDULES:  # the inverse inverts, the derivative differentiates
        s = schedules.schedule(name, beta_d=12.0, beta_min=0.3)
        t = torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64, requires_grad=True)
        assert torch.allclose(s.inv(s.sigma(t)), t)
        (grad,) = torch.autograd.grad(s.sigma(t).sum(), t)
        assert torch.allclose(s.deriv(t), grad)
    with pytest.raises(ValueError, match="discretization"):
        schedules.sigma_steps("ddim", 10, 0.002, 80.0)


def test_iddpm_levels_match_the_recursion():
    """EDM's loop u[j-1] = sqrt((u[j]^2 + 1) / max(abar(j-1) / abar(j), C_1) - 1), written out here."""
    M, C_1, C_2 = 1000, 0.001, 0.008
    u = np.zeros(M + 1)
    abar = lambda j: math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(abar(j - 1) / abar(j), C_1) - 1)
    kept = u[(u >= 0.002) & (u <= 81)]
    want = kept[np.round((len(kept) - 1) / 17 * np.arange(18)).astype(int)]
    got = schedules.sigma_steps("iddpm", 18, 0.002, 81.0).numpy()
    assert np.allclose(got, want, rtol=1e-9)


def test_generate_takes_the_ablation_sampler():
    net = Gaussian(0.5)
    options = dict(num_steps=12, discretization="vp", schedule_name="vp", scaling="vp")
    sampler = functools.partial(schedules.ablation_sampler, **options)
    a = generate(net, range(4), batch_size=3, device="cpu", output="float", sampler=sampler)
    b = generate(net, range(4), batch_size=4, device="cpu", output="float", sampler=sampler)
    assert torch.equal(a, b)  # per-seed noise: batches do not matter
    ref = generate(net, range(4), batch_size=4, device="cpu", output="float", num_steps=12)
    assert torch.isfinite(a).all() and not torch.equal(a, ref)
