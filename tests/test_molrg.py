"""nbhelpers.molrg: MoLRG bases and samples, the closed-form denoiser, the low-rank model, distances."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from nbhelpers.molrg import (
    LowRankDenoiser,
    LowRankStack,
    MoLRG,
    MoLRGDenoiser,
    _assignment,
    subspace_distance,
)


@pytest.fixture
def mix() -> MoLRG:
    """K=2 subspaces of dimension d=4 in n = 3*4*4 = 48."""
    return MoLRG.create(num_classes=2, intrinsic_dim=4, img_resolution=4, img_channels=3, generator=7)


def _flat_bases(bases: torch.Tensor) -> torch.Tensor:
    k, n, d = bases.shape
    return bases.permute(1, 0, 2).reshape(n, k * d)


# ----------------------------------------------------------------------------
# Bases and samples.


def test_bases_orthonormal_and_mutually_orthogonal(mix):
    assert mix.bases.shape == (2, 48, 4) and mix.bases.dtype == torch.float64
    assert mix.shape == (3, 4, 4) and (mix.num_classes, mix.intrinsic_dim, mix.dim) == (2, 4, 48)
    flat = _flat_bases(mix.bases)
    torch.testing.assert_close(flat.T @ flat, torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0)
    # The subspaces are far from trivial (not coordinate axes).
    assert mix.bases.abs().max() < 0.9


def test_bases_reproducible_from_seed():
    a = MoLRG.create(3, 2, 4, 1, generator=11)
    b = MoLRG.create(3, 2, 4, 1, generator=torch.Generator().manual_seed(11))
    c = MoLRG.create(3, 2, 4, 1, generator=12)
    torch.testing.assert_close(a.bases, b.bases, atol=0, rtol=0)
    assert not torch.allclose(a.bases, c.bases)
    # Consecutive blocks: the first K*d columns of one orthogonal matrix (more classes extend the same basis).
    d = MoLRG.create(4, 2, 4, 1, generator=11)
    torch.testing.assert_close(d.bases[:3], a.bases, atol=1e-12, rtol=0)


def test_create_rejects_too_many_dimensions():
    with pytest.raises(ValueError, match="exceeds the ambient dimension"):
        MoLRG.create(num_classes=3, intrinsic_dim=6, img_resolution=4, img_channels=1)


def test_samples_lie_in_their_subspace(mix):
    x, labels = mix.sample(500, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert x.shape == (1000, 3, 4, 4) and labels.tolist() == [0] * 500 + [1] * 500
    flat = x.reshape(len(x), -1)
    u = mix.bases[labels]  # (N, n, d)
    coef = torch.einsum("bnd,bn->bd", u, flat)
    residual = flat - torch.einsum("bnd,bd->bn", u, coef)
    assert residual.abs().max() < 1e-12
    # Latent coefficients are standard normal.
    assert coef.mean().abs() < 0.1 and (coef.var() - 1).abs() < 0.1
    x2, _ = mix.sample(500, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(x, x2, atol=0, rtol=0)
    assert mix.sample(3, generator=0)[0].dtype == torch.float32


def test_save_load_round_trip(mix, tmp_path):
    x, labels = mix.sample(5, generator=3)
    path = mix.save(tmp_path / "sub" / "molrg.npz", samples=x, labels=labels)
    assert sorted(p.name for p in path.parent.iterdir()) == ["molrg.npz"]  # no temporary files left
    back = MoLRG.load(path)
    torch.testing.assert_close(back.bases, mix.bases, atol=0, rtol=0)
    assert back.shape == mix.shape
    xs, ls = MoLRG.load_samples(path)
    torch.testing.assert_close(xs, x, atol=0, rtol=0)
    assert torch.equal(ls, labels)
    plain = mix.save(tmp_path / "plain.npz")
    assert MoLRG.load_samples(plain) is None


def test_load_errors(mix, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        MoLRG.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="bad.npz"):
        MoLRG.load(bad)
    skew = tmp_path / "skew.npz"
    np.savez(skew, bases=2 * mix.bases.numpy(), shape=np.array(mix.shape))
    with pytest.raises(ValueError, match="orthonormal"):
        MoLRG.load(skew)


# ----------------------------------------------------------------------------
# The closed-form denoiser.


def _brute_force_posterior_mean(x: torch.Tensor, bases: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[x0 | x] by Gaussian conditioning per class, with full n x n covariances (not the module's code)."""
    n = bases.shape[1]
    log_lik, means = [], []
    for u in bases:
        cov_x0 = u @ u.T
        cov = cov_x0 + sigma**2 * torch.eye(n, dtype=torch.float64)
        dist = torch.distributions.MultivariateNormal(
            torch.zeros(n, dtype=torch.float64), covariance_matrix=cov
        )
        log_lik.append(dist.log_prob(x))
        means.append(torch.linalg.solve(cov, x.T).T @ cov_x0)  # Cov(x0, x) Cov(x)^-1 x
    w = torch.softmax(torch.stack(log_lik, 1), dim=1)
    return torch.einsum("bk,kbn->bn", w, torch.stack(means))


@pytest.mark.parametrize("sigma", [1e-3, 0.05, 0.3, 1.0, 3.0, 50.0, 1e3])
def test_closed_form_equals_gaussian_conditioning(mix, sigma):
    g = torch.Generator().manual_seed(5)
    x0, _ = mix.sample(6, generator=g, dtype=torch.float64)
    noisy = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    # Include points between the subspaces, where both classes keep weight.
    mid = (x0[:3] + x0[6:9]) / math.sqrt(2) + sigma * torch.randn(
        x0[:3].shape, generator=g, dtype=torch.float64
    )
    x = torch.cat([noisy, mid])
    got = mix.denoiser()(x, sigma).reshape(len(x), -1)
    want = _brute_force_posterior_mean(x.reshape(len(x), -1), mix.bases, sigma)
    scale = want.norm(dim=1, keepdim=True)
    assert ((got - want).norm(dim=1, keepdim=True) <= 1e-7 * scale + 1e-12).all()


def test_denoiser_contract(mix):
    net = mix.denoiser()
    assert isinstance(net, MoLRGDenoiser) and isinstance(net, torch.nn.Module)
    assert (net.img_resolution, net.img_channels, net.label_dim) == (4, 3, 0)
    assert net.sigma_min == 0 and net.sigma_max == math.inf
    assert float(net.round_sigma(0.123)) == 0.123
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    s = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    per_sample = net(x, s)
    torch.testing.assert_close(net(x, s.reshape(-1, 1, 1, 1)), per_sample, atol=0, rtol=0)
    row = torch.stack([net(x[i : i + 1], float(s[i]))[0] for i in range(5)])
    torch.testing.assert_close(row, per_sample, atol=1e-14, rtol=0)
    torch.testing.assert_close(net(x, torch.tensor(0.5)), net(x, 0.5), atol=0, rtol=0)
    out32 = net(x.float(), 0.5)
    assert out32.dtype == torch.float32 and out32.shape == x.shape
    torch.testing.assert_close(out32.double(), net(x, 0.5), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="shape"):
        net(torch.zeros(2, 1, 4, 4), 1.0)


def test_denoiser_limits(mix):
    net = mix.denoiser()
    g = torch.Generator().manual_seed(2)
    x0, labels = mix.sample(4, generator=g, dtype=torch.float64)
    x = x0 + 0.01 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    # sigma = 0: projection onto the closest subspace; tiny sigma agrees.
    u = mix.bases[labels]
    flat = x.reshape(len(x), -1)
    proj = torch.einsum("bnd,bd->bn", u, torch.einsum("bnd,bn->bd", u, flat)).reshape(x.shape)
    torch.testing.assert_close(net(x, 0.0), proj, atol=1e-12, rtol=0)
    torch.testing.assert_close(net(x, 1e-6), proj, atol=1e-9, rtol=0)
    # Huge and infinite sigma: the posterior mean shrinks to the prior mean 0.
    assert net(x, 1e8).abs().max() < 1e-14
    assert torch.equal(net(x, math.inf), torch.zeros_like(x))
    assert torch.isfinite(net(x * 1e3, 1e-3)).all()


def _jacobian_rank(net, x: torch.Tensor, sigma: float, rel: float = 1e-3) -> int:
    f = lambda v: net(v.reshape(x.shape), sigma).reshape(-1)
    jac = torch.autograd.functional.jacobian(f, x.reshape(-1))
    s = torch.linalg.svdvals(jac)
    return int((s > rel * s[0]).sum())


def test_jacobian_rank_d_at_high_snr_and_Kd_at_low_snr(mix):
    g = torch.Generator().manual_seed(4)
    x0, _ = mix.sample(1, generator=g, dtype=torch.float64)
    eps = torch.randn(x0[:1].shape, generator=g, dtype=torch.float64)
    net = mix.denoiser()
    assert _jacobian_rank(net, x0[:1] + 0.01 * eps, 0.01) == 4  # d
    assert _jacobian_rank(net, x0[:1] + 10.0 * eps, 10.0) == 8  # K*d


def test_sampler_with_closed_form_denoiser_lands_on_subspaces(mix):
    sampling = pytest.importorskip("nbhelpers.sampling")
    samples = sampling.generate(mix.denoiser(), range(16), batch_size=8, device="cpu", output="float")
    flat = samples.reshape(16, -1)
    coef = torch.einsum("knd,bn->bkd", mix.bases, flat)
    off = (flat.square().sum(1, keepdim=True) - coef.square().sum(2)).clamp(min=0).sqrt().min(1).values
    assert (off < 0.02 * flat.norm(dim=1)).all()


# ----------------------------------------------------------------------------
# Subspace distance.


def test_subspace_distance_identical_permuted_rotated(mix):
    dist, worst = subspace_distance(mix.bases, mix.bases)
    assert dist.shape == (2,) and worst < 1e-7
    _, worst = subspace_distance(mix.bases.flip(0), mix.bases)
    assert worst < 1e-7
    g = torch.Generator().manual_seed(0)
    rot = torch.linalg.qr(torch.randn(2, 4, 4, generator=g, dtype=torch.float64)).Q
    _, worst = subspace_distance(mix.bases @ rot, mix.bases)
    assert worst < 1e-7
    mixing = torch.randn(2, 4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
    _, worst = subspace_distance(mix.bases @ mixing, mix.bases)  # any spanning set of the same subspaces
    assert worst < 1e-7


def test_subspace_distance_orthogonal_is_one_and_normalisation():
    big = MoLRG.create(4, 3, 4, 3, generator=1)  # four mutually orthogonal 3-d subspaces
    dist, worst = subspace_distance(big.bases[2:], big.bases[:2])
    torch.testing.assert_close(dist, torch.ones(2, dtype=torch.float64), atol=1e-12, rtol=0)
    assert abs(worst - 1) < 1e-12
    # Share 2 of 3 directions: ||P - Q||_F^2 = 2, distance sqrt(2 / (2 d)) = 1/sqrt(3).
    partial = torch.cat([big.bases[:2, :, :2], big.bases[2:, :, :1]], dim=2)
    dist, _ = subspace_distance(partial, big.bases[:2])
    torch.testing.assert_close(
        dist, torch.full((2,), 1 / math.sqrt(3), dtype=torch.float64), atol=1e-12, rtol=0
    )
    # More learned subspaces than true ones: the best ones are matched.
    dist, worst = subspace_distance(big.bases[[3, 1, 2, 0]], big.bases[:2])
    assert worst < 1e-7
    with pytest.raises(ValueError, match="cannot match"):
        subspace_distance(big.bases[:1], big.bases[:2])


def test_assignment_matches_brute_force():
    rng = np.random.default_rng(0)
    for rows, cols in [(1, 1), (2, 2), (3, 5), (4, 4), (5, 6), (6, 6)]:
        for _ in range(5):
            cost = rng.random((rows, cols))
            got = _assignment(cost)
            assert len(set(got)) == rows
            best = min(
                sum(cost[i, p[i]] for i in range(rows)) for p in itertools.permutations(range(cols), rows)
            )
            assert sum(cost[i, got[i]] for i in range(rows)) == pytest.approx(best, abs=1e-12)


# ----------------------------------------------------------------------------
# The low-rank parameterised denoiser.


def test_lowrank_with_true_bases_is_the_closed_form(mix):
    net = LowRankDenoiser(2, 4, 4, 3, generator=0)
    assert (net.img_resolution, net.img_channels, net.label_dim, net.sigma_min) == (4, 3, 0, 0)
    assert net.U.shape == (2, 48, 4) and isinstance(net.U, torch.nn.Parameter)
    with torch.no_grad():
        net.U.copy_(mix.bases @ torch.linalg.qr(torch.randn(2, 4, 4, dtype=torch.float64)).Q)
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(net(x, 0.7), mix.denoiser()(x, 0.7), atol=1e-6, rtol=0)
    ortho = net.orthonormal_bases()
    assert subspace_distance(ortho, mix.bases)[1] < 1e-6
    eye = torch.eye(4, dtype=ortho.dtype).expand(2, 4, 4)
    torch.testing.assert_close(ortho.transpose(1, 2) @ ortho, eye, atol=1e-10, rtol=0)
    # Checkpoint round trip through _init_kwargs and the state dict.
    clone = LowRankDenoiser(**net._init_kwargs)
    clone.load_state_dict(net.state_dict())
    torch.testing.assert_close(clone(x, 0.7), net(x, 0.7), atol=0, rtol=0)
    # Gradients reach U.
    net(x.float(), torch.full((3,), 0.5)).square().sum().backward()
    assert net.U.grad is not None and net.U.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="augmentation"):
        net(x, 0.5, None, augment_labels=torch.zeros(3, 9))


def test_lowrank_stack_is_its_members_side_by_side():
    """A stack of M low-rank models on (N, M*C, R, R) gives each member's output on its own channels."""
    members = [LowRankDenoiser(2, 3, 4, 3, generator=seed) for seed in range(3)]
    stack = LowRankStack(members)
    assert (stack.img_channels, stack.img_resolution, stack.U.shape) == (9, 4, (3, 2, 48, 3))
    x = torch.randn(5, 9, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.0, 0.1, 1.0, 10.0, 100.0], dtype=torch.float64)
    out = stack(x, sigma)
    for m, net in enumerate(members):
        block = slice(3 * m, 3 * m + 3)
        torch.testing.assert_close(out[:, block], net(x[:, block], sigma), atol=1e-12, rtol=0)
    # members() gives independent copies that reproduce the stack.
    copies = stack.members()
    for m, net in enumerate(copies):
        torch.testing.assert_close(
            net(x[:, 3 * m : 3 * m + 3], sigma), out[:, 3 * m : 3 * m + 3], atol=1e-6, rtol=0
        )
    with torch.no_grad():
        copies[0].U.zero_()
    assert stack.U.abs().sum() > 0
    with pytest.raises(ValueError, match="share K, n, d"):
        LowRankStack([members[0], LowRankDenoiser(2, 2, 4, 3)])
    with pytest.raises(ValueError, match="at least one"):
        LowRankStack([])


def _train_restarts(
    x: torch.Tensor, k: int, d: int, restarts: int, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train ``restarts`` LowRankDenoisers at once (vmap) with the EDM loss; return final losses and bases."""
    models = [LowRankDenoiser(k, d, x.shape[-1], x.shape[1], generator=seed) for seed in range(restarts)]
    params, buffers = stack_module_state(models)
    params = {name: torch.nn.Parameter(p) for name, p in params.items()}
    base = copy.deepcopy(models[0]).to("meta")
    batched = vmap(lambda p, b, xx, ss: functional_call(base, (p, b), (xx, ss)), in_dims=(0, 0, None, None))

    def loss(data: torch.Tensor, g: torch.Generator) -> torch.Tensor:  # EDM: ln sigma ~ N(-1.2, 1.2^2)
        sigma = torch.exp(torch.randn(len(data), generator=g) * 1.2 - 1.2)
        s = sigma.reshape(-1, 1, 1, 1)
        noisy = data + s * torch.randn(data.shape, generator=g)
        weight = (s**2 + 0.5**2) / (s * 0.5) ** 2
        return (weight * (batched(params, buffers, noisy, sigma) - data).square()).mean(dim=(1, 2, 3, 4))

    opt = torch.optim.Adam(params.values(), lr=3e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(123)
    for _ in range(steps):
        opt.zero_grad()
        loss(x, g).sum().backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        final = loss(x.repeat(8, 1, 1, 1), torch.Generator().manual_seed(321))
    return final, params["U"].detach()


@pytest.mark.slow
def test_lowrank_training_recovers_subspaces_only_with_enough_samples(mix):
    """N_k >> d: the best of a few random restarts (by training loss) finds the subspaces; N_k < d: none does.

    The loss has spurious local minima (learned subspaces mixing directions of several true ones,
    as in K-subspaces clustering), so a single random start fails in about half the cases.
    """
    results = {}
    for n_k in (64, 2):
        x, _ = mix.sample(n_k, generator=torch.Generator().manual_seed(n_k))
        final, u = _train_restarts(x, k=2, d=4, restarts=8, steps=300)
        dists = [subspace_distance(ui, mix.bases)[1] for ui in u]
        results[n_k] = (dists[int(final.argmin())], min(dists))
    best_many, _ = results[64]
    chosen_few, best_few = results[2]
    assert best_many < 0.2, results
    assert best_few > 0.5 and chosen_few > 0.5, results


def test_off_subspace_and_nearest_class():
    """A point on subspace k is at distance 0 from it and its nearest class is k; noise moves it away."""
    mix = MoLRG.create(3, 2, 4, 3, generator=0)
    x, labels = mix.sample(5, generator=1)
    assert torch.equal(mix.nearest_class(x), labels)
    assert float(mix.off_subspace(x).max()) < 1e-6
    e = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    e -= torch.einsum(
        "knd,kmd->kmn", mix.bases, torch.einsum("knd,kmn->kmd", mix.bases, e.reshape(3, 5, -1))
    ).reshape(e.shape)
    far = mix.off_subspace(x.double() + e)
    assert bool((far > 0.1).all()) and bool((far < 1).all())
