"""Tests for nbhelpers.jacobian: exact Jacobians, rank rules, fallbacks and rank profiles."""

from __future__ import annotations

import importlib.util
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from nbhelpers import jacobian as jac_mod
from nbhelpers.jacobian import (
    AUTHORS_SNR_GRID,
    RankTable,
    denoiser_jacobian,
    effective_rank,
    jacobian_singular_values,
    rank_profile,
    sigma_grid_points,
    trajectory_points,
)

# ----------------------------------------------------------------------------
# Stand-in denoisers.


class _Denoiser(torch.nn.Module):
    """Common attributes of a denoiser (see the shared contract)."""

    def __init__(self, channels: int, resolution: int):
        super().__init__()
        self.img_channels, self.img_resolution, self.label_dim = channels, resolution, 0
        self.sigma_min, self.sigma_max = 0.0, float("inf")

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class LinearDenoiser(_Denoiser):
    """D(x) = A x for a fixed matrix A (n x n); its Jacobian is A everywhere."""

    def __init__(self, a: torch.Tensor, channels: int, resolution: int):
        super().__init__(channels, resolution)
        self.register_buffer("a", a)

    def forward(self, x, sigma, class_labels=None):
        flat = x.reshape(x.shape[0], -1).to(self.a.dtype)
        return (flat @ self.a.T).reshape(x.shape)


class SmallConvNet(_Denoiser):
    """EDM-style preconditioned conv net with GroupNorm, self-attention and dropout; float32 inside."""

    def __init__(
        self, channels: int = 2, resolution: int = 4, width: int = 8, gen: torch.Generator | None = None
    ):
        super().__init__(channels, resolution)
        gen = gen or torch.Generator().manual_seed(1)
        self.conv0 = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, width)
        self.qkv = torch.nn.Conv2d(width, 3 * width, 1)
        self.drop = torch.nn.Dropout(0.5)
        self.conv1 = torch.nn.Conv2d(width, channels, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))

    def forward(self, x, sigma, class_labels=None):
        x = x.to(torch.float32)
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        h = self.conv0(x / (1 + s**2).sqrt())
        h = F.silu(self.norm(h)) * (1 + torch.log(s))
        q, k, v = self.qkv(h).flatten(2).chunk(3, dim=1)
        w = torch.softmax(torch.einsum("nci,ncj->nij", q, k) / math.sqrt(q.shape[1]), dim=2)
        h = h + torch.einsum("nij,ncj->nci", w, v).reshape(h.shape)
        f = self.conv1(self.drop(h))
        return x / (1 + s**2) + s / (1 + s**2).sqrt() * f


class _Square(torch.autograd.Function):
    """Old-style custom function (no setup_context): torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a * a

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        return 2 * a * grad


class CustomOpNet(SmallConvNet):
    def forward(self, x, sigma, class_labels=None):
        return _Square.apply(super().forward(x, sigma))


class MoLRGDenoiser(_Denoiser):
    """Closed-form posterior mean of a mixture of K orthogonal d-dim Gaussians in R^n (P2)."""

    def __init__(self, bases: torch.Tensor, channels: int, resolution: int):
        super().__init__(channels, resolution)
        self.register_buffer("bases", bases)  # (K, n, d)

    def forward(self, x, sigma, class_labels=None):
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        coef = torch.einsum("knd,bn->bkd", self.bases, flat)  # U_k^T x
        w = torch.softmax(coef.square().sum(-1) / (2 * s**2 * (1 + s**2)), dim=1)  # (B, K)
        proj = torch.einsum("knd,bkd->bkn", self.bases, coef)  # U_k U_k^T x
        return (torch.einsum("bk,bkn->bn", w, proj) / (1 + s**2)).reshape(x.shape)


def _molrg(num_classes=2, dim=3, channels=3, resolution=4, seed=0):
    n = channels * resolution * resolution
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    bases = q[:, : num_classes * dim].reshape(n, num_classes, dim).permute(1, 0, 2).contiguous()
    net = MoLRGDenoiser(bases, channels, resolution)
    coeffs = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    clean = torch.einsum("knd,kd->kn", bases, coeffs).reshape(num_classes, channels, resolution, resolution)
    return net, clean


def _reference_jacobian(net, x, sigma, dtype=torch.float32):
    """Per-point Jacobians with torch.autograd.functional.jacobian (default settings)."""
    sigma = torch.as_tensor(sigma, dtype=dtype).expand(x.shape[0])
    out = []
    for b in range(x.shape[0]):
        fn = lambda z, b=b: net(z[None], sigma[b : b + 1]).to(dtype)[0]
        j = torch.autograd.functional.jacobian(fn, x[b].to(dtype))
        out.append(j.reshape(x[b].numel(), x[b].numel()))
    return torch.stack(out)


def _matrix_with_spectrum(n, spectrum, gen):
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    s = torch.zeros(n, dtype=torch.float64)
    s[: len(spectrum)] = torch.as_tensor(spectrum, dtype=torch.float64)
    return u @ torch.diag(s) @ v.T


# ----------------------------------------------------------------------------
# denoiser_jacobian.


@pytest.mark.parametrize("method", ["vjp", "jvp", "auto"])
def test_linear_denoiser_jacobian_is_the_matrix(method, gen):
    a = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    net = LinearDenoiser(a, 3, 2)
    x = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64)
    jac = denoiser_jacobian(net, x, 0.7, method=method, dtype=torch.float64)
    assert jac.shape == (4, 12, 12) and jac.dtype == torch.float64
    torch.testing.assert_close(jac, a.expand(4, 12, 12), rtol=0, atol=1e-12)
    assert denoiser_jacobian(net, x, 0.7, method=method).dtype == torch.float32


@pytest.mark.parametrize("rank", [1, 5, 17])
def test_linear_denoiser_known_rank(rank, gen):
    n = 48
    spectrum = 0.8 + 0.4 * torch.rand(rank, generator=gen, dtype=torch.float64)
    a = _matrix_with_spectrum(n, spectrum.tolist() + [1e-5] * 3, gen)
    net = LinearDenoiser(a, 3, 4)
    x = torch.randn(2, 3, 4, 4, generator=gen)
    sv = jacobian_singular_values(net, x, 1.0, dtype=torch.float64)
    assert sv.shape == (2, n)
    for rule in ("authors", "energy"):
        assert effective_rank(sv, rule=rule).tolist() == [rank, rank]
    assert sv.dtype == torch.float64  # the SVD runs in float64 by default
    sv32 = jacobian_singular_values(net, x, 1.0, svd_dtype=None)
    assert sv32.dtype == torch.float32 and effective_rank(sv32[0]) == rank


@pytest.mark.parametrize("method", ["vjp", "jvp"])
def test_conv_net_matches_autograd_functional(method):
    net = SmallConvNet().train()  # dropout on: the Jacobian must switch it off
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.05, 0.8, 6.0])
    jac = denoiser_jacobian(net, x, sigma, method=method)
    assert net.training and net.drop.training  # modes restored
    net.eval()
    ref = _reference_jacobian(net, x, sigma)
    assert jac.shape == (3, 32, 32)
    torch.testing.assert_close(jac, ref, rtol=0, atol=1e-5)
    assert (jac[0] - jac[2]).abs().max() > 1e-2  # sigma per point is used


def test_chunk_sizes_agree():
    net = SmallConvNet()  # computes in float32: chunks differ only by rounding
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    full = denoiser_jacobian(net, x, 0.5, chunk_size=32)
    for chunk in (1, 5, 31, 1000, None):
        torch.testing.assert_close(denoiser_jacobian(net, x, 0.5, chunk_size=chunk), full, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        denoiser_jacobian(net, x, 0.5, chunk_size=3, method="jvp"), full, rtol=0, atol=1e-6
    )
    molrg, clean = _molrg()  # float64 throughout
    full = denoiser_jacobian(molrg, clean, 0.3, chunk_size=48, dtype=torch.float64)
    for chunk in (1, 7, 47, None):
        got = denoiser_jacobian(molrg, clean, 0.3, chunk_size=chunk, dtype=torch.float64)
        torch.testing.assert_close(got, full, rtol=0, atol=1e-14)


def test_points_are_independent():
    net = SmallConvNet()
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.3, 1.0, 2.0])
    batch = denoiser_jacobian(net, x, sigma)
    single = denoiser_jacobian(net, x[1:2], sigma[1:2].reshape(1, 1, 1, 1))
    torch.testing.assert_close(batch[1:2], single, rtol=0, atol=1e-6)


def test_fallback_for_untransformable_network(monkeypatch):
    net = CustomOpNet()
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(6))
    ref = _reference_jacobian(net.eval(), x, 0.4)
    with pytest.warns(RuntimeWarning, match="computed with batched autograd"):
        jac = denoiser_jacobian(net, x, 0.4, chunk_size=7)
    torch.testing.assert_close(jac, ref, rtol=0, atol=1e-5)

    def broken(*args, **kwargs):
        raise RuntimeError("batched autograd unavailable")

    monkeypatch.setattr(jac_mod, "_jac_autograd_batched", broken)
    with pytest.warns(RuntimeWarning, match="computed with replicated batch"):
        jac = denoiser_jacobian(net, x, 0.4, chunk_size=7)
    torch.testing.assert_close(jac, ref, rtol=0, atol=1e-5)


def test_bad_input_is_rejected(gen):
    net = LinearDenoiser(torch.eye(12, dtype=torch.float64), 3, 2)
    x = torch.randn(2, 3, 2, 2, generator=gen)
    with pytest.raises(ValueError, match="sigma"):
        denoiser_jacobian(net, x, torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        denoiser_jacobian(net, x, 0.0)
    with pytest.raises(ValueError, match="method"):
        denoiser_jacobian(net, x, 1.0, method="fd")
    with pytest.raises(ValueError, match="chunk_size"):
        denoiser_jacobian(net, x, 1.0, chunk_size=0)
    with pytest.raises(ValueError, match="class_labels"):
        denoiser_jacobian(net, x, 1.0, class_labels=torch.zeros(3, 10))
    with pytest.raises(ValueError, match="output shape"):
        denoiser_jacobian(lambda z, s, c=None: z[:, :1], x, 1.0)


# ----------------------------------------------------------------------------
# effective_rank.


def _brute_force_rank(s, ratio, rule):
    s = sorted((float(v) for v in s), reverse=True)
    total = sum(v * v for v in s)
    acc = 0.0
    for r, v in enumerate(s, start=1):
        acc += v * v
        if (rule == "authors" and math.sqrt(acc) > ratio * math.sqrt(total)) or (
            rule == "energy" and acc > ratio * total
        ):
            return r
    return len(s)


def test_effective_rank_rules_and_batching(gen):
    s = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1])
    # energies 9, 13, 14, 14.25, 14.26: authors at 0.99 needs 0.9801 of it, energy rule 0.99.
    assert effective_rank(s, 0.99, "authors") == 3
    assert effective_rank(s, 0.99, "energy") == 4
    assert effective_rank(s, 0.9, "authors") == 2
    assert effective_rank(s, 0.9, "energy") == 2
    assert isinstance(effective_rank(s), int)
    spectra = torch.rand(3, 4, 30, generator=gen, dtype=torch.float64) ** 4
    for rule in ("authors", "energy"):
        for ratio in (0.5, 0.9, 0.99):
            got = effective_rank(spectra, ratio, rule)
            assert got.shape == (3, 4) and got.dtype == torch.long
            want = [[_brute_force_rank(row, ratio, rule) for row in block] for block in spectra.tolist()]
            assert got.tolist() == want
    # The authors' rule at ratio equals the energy rule at ratio**2.
    torch.testing.assert_close(
        effective_rank(spectra, 0.99, "authors"), effective_rank(spectra, 0.9801, "energy")
    )
    # Order of the input does not matter; an all-zero spectrum has rank 0; ratio 1 gives the support size.
    assert effective_rank(s.flip(0).numpy()) == 3
    assert effective_rank([0.0, 0.0, 0.0]) == 0
    assert effective_rank([1.0, 1.0, 0.0], ratio=1.0) == 3


def test_effective_rank_bad_input():
    with pytest.raises(ValueError, match="rule"):
        effective_rank([1.0], rule="nuclear")
    with pytest.raises(ValueError, match="ratio"):
        effective_rank([1.0], ratio=1.5)
    with pytest.raises(ValueError, match="non-negative"):
        effective_rank([1.0, -0.1])
    with pytest.raises(ValueError, match="non-empty"):
        effective_rank(torch.ones(3, 0))


# ----------------------------------------------------------------------------
# MoLRG closed form: rank d at high SNR, K*d at low SNR.


@pytest.mark.parametrize("rule", ["authors", "energy"])
def test_molrg_closed_form_rank(rule):
    net, clean = _molrg(num_classes=2, dim=3)
    eps = torch.randn(clean.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for sigma, want in ((0.01, 3), (10.0, 6)):
        sv = jacobian_singular_values(net, clean + sigma * eps, sigma, dtype=torch.float64)
        assert effective_rank(sv, rule=rule).tolist() == [want, want]


def test_rank_profile_sigma_grid_molrg():
    net, clean = _molrg(num_classes=2, dim=3)
    df = rank_profile(
        net,
        clean=clean,
        generator=torch.Generator().manual_seed(8),
        rule=["authors", "energy"],
        dtype=torch.float64,
    )
    assert list(df.columns) == [
        "point",
        "seed",
        "step",
        "sigma",
        "snr",
        "rank",
        "rank_ratio",
        "n",
        "rule",
        "ratio",
    ]
    assert len(df) == len(AUTHORS_SNR_GRID) * 2 * 2
    assert (df["n"] == 48).all() and df["seed"].isna().all()
    assert sorted(df["snr"].unique().round(6).tolist(), reverse=True) == [
        round(s, 6) for s in AUTHORS_SNR_GRID
    ]
    assert ((df["rank_ratio"] - df["rank"] / 48).abs() < 1e-12).all()
    for rule in ("authors", "energy"):
        sub = df[df.rule == rule]
        mean = sub.groupby("snr")["rank"].mean().sort_index(ascending=False)  # high SNR first
        assert mean.iloc[0] == 3 and mean.iloc[-1] == 6
        assert mean.is_monotonic_increasing  # rank grows as SNR falls


def test_rank_profile_points_seeds_and_errors():
    net, clean = _molrg(num_classes=2, dim=3)
    df = rank_profile(
        net, clean=clean, sigmas=[0.01, 10.0], seeds=[11, 12], dtype=torch.float64, batch_size=1
    )
    assert df["seed"].tolist() == [11, 12, 11, 12] and df["step"].tolist() == [0, 0, 1, 1]
    assert df["rank"].tolist() == [3, 3, 6, 6]
    again = rank_profile(net, clean=clean, sigmas=[0.01, 10.0], seeds=[11, 12], dtype=torch.float64)
    assert again.equals(df)
    noisy = clean + 0.01 * torch.randn(
        clean.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64
    )
    df = rank_profile(net, noisy, sigmas=torch.tensor([0.01]), dtype=torch.float64)
    assert df["rank"].tolist() == [3, 3] and df["point"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="exactly one"):
        rank_profile(net, noisy, clean=clean)
    with pytest.raises(ValueError, match="generator"):
        rank_profile(net, clean=clean)
    with pytest.raises(ValueError, match="sigmas"):
        rank_profile(net, noisy, sigmas=[0.0])
    with pytest.raises(ValueError, match="rule"):
        rank_profile(net, noisy, rule="trace")
    with pytest.raises(ValueError, match="trajectory"):
        rank_profile(net, noisy, sigmas=[1.0], trajectory=True)


def test_rank_profile_trajectory_uses_sampler_points():
    """The Jacobian is taken at each step's starting point x_i with sigma t_i, as the authors do."""
    from nbhelpers.sampling import SeedNoise, edm_sampler, edm_sigmas

    net, _ = _molrg(num_classes=2, dim=3)
    latents = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    kw = dict(num_steps=4, sigma_min=0.01, sigma_max=10.0, order=1)
    df = rank_profile(net, latents, trajectory=True, rule=["authors", "energy"], dtype=torch.float64, **kw)
    sigmas = edm_sigmas(4, 0.01, 10.0, 7.0, net=net)[:-1].tolist()
    assert df["step"].tolist() == [s for s in range(4) for _ in range(4)]
    assert df["sigma"].tolist() == pytest.approx([s for s in sigmas for _ in range(4)], rel=1e-12)
    _, traj = edm_sampler(net, latents, return_trajectory=True, **kw)
    for step, (sigma, x, _) in enumerate(traj):
        sv = jacobian_singular_values(net, x, sigma, dtype=torch.float64)
        for rule in ("authors", "energy"):
            got = df[(df.step == step) & (df.rule == rule)].sort_values("point")["rank"].tolist()
            assert got == effective_rank(sv, rule=rule).tolist()
    assert df[df.step == 0]["rank"].tolist() == [6] * 4 and df[df.step == 3]["rank"].tolist() == [3] * 4
    seeded = rank_profile(net, trajectory=True, seeds=[1, 2], dtype=torch.float64, **kw)
    assert seeded["seed"].tolist() == [1, 2] * 4
    from_latents = rank_profile(
        net, SeedNoise([1, 2]).randn((3, 4, 4)), trajectory=True, dtype=torch.float64, **kw
    )
    assert from_latents["rank"].tolist() == seeded["rank"].tolist()
    with pytest.raises(ValueError, match="latents"):
        rank_profile(net, trajectory=True)


def test_point_generators_and_rank_table():
    """The trajectory is visited step by step (nothing kept); the grid's points share one eps."""
    from nbhelpers.sampling import edm_sampler

    net, clean = _molrg(num_classes=2, dim=3)
    latents = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    kw = dict(num_steps=4, sigma_min=0.01, sigma_max=10.0, order=1)
    visits = []
    final = trajectory_points(net, latents, lambda i, s, x: visits.append((i, s, x.clone())), **kw)
    ref, traj = edm_sampler(net, latents, return_trajectory=True, **kw)
    assert torch.equal(final, ref) and [v[0] for v in visits] == [0, 1, 2, 3]
    assert all(s == t and torch.equal(x, y) for (_, s, x), (t, y, _) in zip(visits, traj))
    eps = torch.ones_like(clean)
    grid = list(sigma_grid_points([0.5, 2.0], clean=clean, noise=lambda shape: eps))
    assert [(i, s) for i, s, _ in grid] == [(0, 0.5), (1, 2.0)]
    assert torch.equal(grid[1][2], clean + 2.0)
    with pytest.raises(ValueError, match="generator= or seeds="):
        list(sigma_grid_points([0.5], clean=clean))
    table = RankTable(net, rule=["authors", "energy"], seeds=[5, 6], dtype=torch.float64)
    for i, s, x in grid:
        table.add(i, s, x)
    df = table.frame()
    assert list(df.columns) == list(RankTable.COLUMNS) and len(df) == 2 * 2 * 2
    assert df["seed"].tolist() == [5, 5, 6, 6] * 2
    with pytest.raises(ValueError, match="2 seeds for 1 points"):
        table.add(0, 1.0, clean[:1])


# ----------------------------------------------------------------------------
# Integration with the project's networks, sampler and MoLRG module (when present).

_HAS = {m: importlib.util.find_spec(f"nbhelpers.{m}") is not None for m in ("networks", "sampling", "molrg")}


@pytest.mark.skipif(not _HAS["networks"], reason="nbhelpers.networks not present")
@pytest.mark.parametrize(
    ("arch", "precond", "method"),
    [("ddpmpp", "edm", "vjp"), ("ddpmpp", "vp", "jvp"), ("ncsnpp", "ve", "vjp")],
)
def test_tiny_unet_matches_autograd_functional(arch, precond, method):
    from nbhelpers.networks import make_network

    torch.manual_seed(0)
    net = make_network(
        arch,
        precond,
        4,
        3,
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        dropout=0.1,
    )
    with torch.no_grad():  # EDM zero-inits the output layers; randomise so the U-Net path matters
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    net.train()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    sigma = torch.tensor([0.05, 3.0], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # torch.func must handle GroupNorm and attention
        jac = denoiser_jacobian(net, x, sigma, method=method)
    assert net.training
    ref = _reference_jacobian(net.eval(), x, sigma)
    torch.testing.assert_close(jac, ref, rtol=0, atol=1e-5)
    off_diagonal = ref - torch.diag_embed(torch.diagonal(ref, dim1=1, dim2=2))
    assert off_diagonal.abs().max() > 1e-2  # the U-Net part of J (c_skip only adds a diagonal) matters


@pytest.mark.skipif(not _HAS["molrg"], reason="nbhelpers.molrg not present")
def test_molrg_module_denoisers_rank():
    from nbhelpers.molrg import LowRankDenoiser, MoLRG

    model = MoLRG.create(
        num_classes=2, intrinsic_dim=3, img_resolution=4, img_channels=3, generator=0, device="cpu"
    )
    clean, _ = model.sample(2, generator=1, dtype=torch.float64)
    low_rank = LowRankDenoiser(2, 3, 4, 3, generator=2)
    for net in (model.denoiser(), low_rank):
        df = rank_profile(
            net,
            clean=clean,
            sigmas=[0.01, 10.0],
            generator=torch.Generator().manual_seed(3),
            dtype=torch.float64,
        )
        assert df["rank"].tolist() == [3] * 4 + [6] * 4
        assert df["rank_ratio"].tolist() == [3 / 48] * 4 + [6 / 48] * 4
