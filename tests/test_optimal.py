"""Tests of the empirical optimal denoiser against a direct float64 softmax computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nbhelpers.optimal import OptimalDenoiser

N, B, SHAPE = 37, 6, (3, 4, 4)


@pytest.fixture
def data(gen):
    """Training images (N, 3, 4, 4) in [-1, 1], noisy queries near some of them, per-sample sigmas."""
    train = torch.rand(N, *SHAPE, generator=gen, dtype=torch.float64) * 2 - 1
    x = train[:B] + 0.3 * torch.randn(B, *SHAPE, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.02, 0.1, 0.3, 1.0, 10.0, 0.05], dtype=torch.float64)
    return train, x, sigma


def direct(x: torch.Tensor, train: torch.Tensor, sigma: torch.Tensor):
    """Posterior mean and weights with explicit (B, N, D) differences, float64."""
    d2 = (x.reshape(len(x), 1, -1) - train.reshape(1, len(train), -1)).square().sum(-1)
    w = torch.softmax(-d2 / (2 * sigma.reshape(-1, 1) ** 2), dim=1)
    return (w @ train.reshape(len(train), -1)).reshape(x.shape), w


@pytest.mark.parametrize("chunk", [1, 7, N, N + 10])
def test_equals_direct_softmax_float64(data, chunk):
    train, x, sigma = data
    den = OptimalDenoiser(train, chunk_size=chunk, device="cpu", dtype=torch.float64)
    ref, _ = direct(x, train, sigma)
    out = den(x, sigma)
    assert out.dtype == torch.float64 and out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # the same sigma in every accepted form
    torch.testing.assert_close(den(x, sigma.reshape(-1, 1, 1, 1)), ref, rtol=0, atol=1e-12)
    ref1, _ = direct(x, train, torch.full((B,), 0.2, dtype=torch.float64))
    for s in (0.2, torch.tensor(0.2), torch.tensor([0.2])):
        torch.testing.assert_close(den(x, s), ref1, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, N + 10])
def test_float32_products_are_accurate(data, chunk):
    train, x, sigma = data
    den = OptimalDenoiser(train.float(), chunk_size=chunk, device="cpu")
    ref, _ = direct(x, train.float().double(), sigma)
    out32 = den(x.float(), sigma.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(den(x, sigma), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_sigma_returns_the_training_point(data, dtype):
    train, _, _ = data
    idx = torch.tensor([3, 17, 30, 0])
    x = train[idx] + 1e-3 * torch.ones_like(train[idx])
    den = OptimalDenoiser(train.to(dtype), chunk_size=8, device="cpu", dtype=dtype)
    for sigma in (1e-4, 0.0):
        out = den(x, sigma)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, train[idx], rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)
    assert torch.equal(den.nearest_train_index(x), idx)
    stats = den.posterior_stats(x, 1e-4)
    assert torch.equal(stats.nearest, idx)
    torch.testing.assert_close(stats.max_weight, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(stats.entropy, torch.zeros(4, dtype=torch.float64))


def test_large_sigma_gives_the_mean(data):
    train, x, _ = data
    den = OptimalDenoiser(train, chunk_size=5, device="cpu", dtype=torch.float64)
    mean = train.mean(0, keepdim=True).expand_as(x)
    torch.testing.assert_close(den(x, 1e5), mean, rtol=0, atol=1e-8)
    torch.testing.assert_close(den(x, math.inf), mean, rtol=0, atol=1e-12)
    stats = den.posterior_stats(x, math.inf)
    torch.testing.assert_close(stats.entropy, torch.full((B,), math.log(N), dtype=torch.float64))
    torch.testing.assert_close(stats.max_weight, torch.full((B,), 1 / N, dtype=torch.float64))


def test_posterior_stats_match_direct_weights(data):
    train, x, sigma = data
    den = OptimalDenoiser(train, chunk_size=4, device="cpu", dtype=torch.float64)
    ref, w = direct(x, train, sigma)
    stats = den.posterior_stats(x, sigma)
    torch.testing.assert_close(stats.denoised, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.max_weight, w.max(1).values, rtol=0, atol=1e-12)
    entropy = -(w * torch.log(w.clamp_min(1e-300))).sum(1)
    torch.testing.assert_close(stats.entropy, entropy, rtol=0, atol=1e-10)
    assert torch.equal(stats.nearest, w.argmax(1))


def test_uint8_input_and_nearest_index(gen):
    images = torch.randint(0, 256, (50, *SHAPE), generator=gen, dtype=torch.uint8)
    den = OptimalDenoiser(images.numpy(), chunk_size=16, device="cpu", dtype=torch.float64)
    model = images.double() / 127.5 - 1
    x = torch.randn(9, *SHAPE, generator=gen, dtype=torch.float64)
    ref, _ = direct(x, model, torch.full((9,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(den(x, 0.5), ref, rtol=0, atol=1e-12)
    brute = torch.cdist(x.reshape(9, -1), model.reshape(50, -1)).argmin(1)
    assert torch.equal(den.nearest_train_index(x), brute)
    assert (den.img_channels, den.img_resolution, den.label_dim) == (3, 4, 0)
    assert den.sigma_min == 0 and den.sigma_max == math.inf
    assert torch.equal(den.round_sigma(torch.tensor([0.3])), torch.tensor([0.3]))


def test_streaming_equals_in_memory(gen):
    images = torch.randint(0, 256, (50, *SHAPE), generator=gen, dtype=torch.uint8)
    x = torch.randn(B, *SHAPE, generator=gen, dtype=torch.float64)
    sigma = torch.linspace(0.05, 2.0, B, dtype=torch.float64)
    mem = OptimalDenoiser(images, chunk_size=16, device="cpu", dtype=torch.float64)
    ref = mem(x, sigma)
    batches = [images[i : i + 13].numpy() for i in range(0, 50, 13)]  # uneven batches, larger than no chunk
    calls = []

    def source():
        calls.append(1)
        return iter(batches)

    stream = OptimalDenoiser(source, chunk_size=5, device="cpu", dtype=torch.float64)
    assert stream.streaming and stream.num_train is None
    torch.testing.assert_close(stream(x, sigma), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(stream(x, sigma), ref, rtol=0, atol=1e-12)
    assert stream.num_train == 50 and len(calls) == 3  # one peek at construction, one per call
    # a re-iterable of (images, labels) tuples, float batches in model space
    pairs = [(torch.from_numpy(b).double() / 127.5 - 1, None) for b in batches]
    stream2 = OptimalDenoiser(pairs, chunk_size=100, device="cpu", dtype=torch.float64)
    torch.testing.assert_close(stream2(x, sigma), ref, rtol=0, atol=1e-12)
    assert torch.equal(stream2.nearest_train_index(x), mem.nearest_train_index(x))
    # float32 products, streamed
    stream32 = OptimalDenoiser(source, chunk_size=7, device="cpu")
    torch.testing.assert_close(stream32(x, sigma), ref, rtol=0, atol=2e-6)


def test_streaming_from_a_dataset_folder(tmp_path, gen):
    data = pytest.importorskip("nbhelpers.data")
    images = np.random.default_rng(0).integers(0, 256, (20, 3, 8, 8), dtype=np.uint8)
    data.write_dataset(images, tmp_path / "ds")
    stream = OptimalDenoiser(
        lambda: data.iter_image_batches(tmp_path / "ds", 6), device="cpu", dtype=torch.float64
    )
    mem = OptimalDenoiser(images, device="cpu", dtype=torch.float64)
    x = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(stream(x, 0.7), mem(x, 0.7), rtol=0, atol=1e-12)


def test_differentiable_in_x(data):
    train, x, sigma = data
    den = OptimalDenoiser(train[:9], chunk_size=2, device="cpu", dtype=torch.float64)
    xg = x[:2].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda inp: den(inp, sigma[1:3]), (xg,))
    # the analytic Jacobian of the posterior mean: J = Cov_w(y) / sigma^2
    s = 1.5  # at the data's centre the weights spread over several points: the Jacobian is far from 0
    y = train[:9].reshape(9, -1)
    centre = train[:9].mean(0, keepdim=True)
    jac = torch.autograd.functional.jacobian(lambda inp: den(inp, s).reshape(-1), centre)
    _, w = direct(centre, train[:9], torch.tensor([s], dtype=torch.float64))
    assert w.max() < 0.9
    mean = w @ y
    cov = (y * w.T).T @ y - mean.T @ mean
    assert cov.abs().max() > 0.05
    torch.testing.assert_close(jac.reshape(48, 48), cov / s**2, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_works_with_the_jacobian_module(data, dtype):
    jacobian = pytest.importorskip("nbhelpers.jacobian")
    train, x, _ = data
    den = OptimalDenoiser(train.to(dtype), chunk_size=7, device="cpu", dtype=dtype)
    s, q = 1.5, 0.1 * x[:3]  # near the centre of the data: many points share the weight
    y = train.reshape(N, -1)
    _, w = direct(q, train, torch.full((3,), s, dtype=torch.float64))
    mean = w @ y
    cov = torch.einsum("bn,ni,nj->bij", w, y, y) - mean[:, :, None] * mean[:, None, :]
    assert cov.abs().amax((1, 2)).min() > 0.05
    jac = jacobian.denoiser_jacobian(den, q, s, dtype=torch.float64)
    torch.testing.assert_close(jac, cov / s**2, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)


def own_euler_sampler(net, latents, sigmas):
    x = latents.double() * sigmas[0]
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s_cur) * (x - net(x, s_cur).double()) / s_cur
    return x


def _distance_to_train(samples, train):
    return torch.cdist(samples.reshape(len(samples), -1), train.reshape(len(train), -1)).min(1).values


def test_sampling_returns_training_points(data, gen):
    train, _, _ = data
    den = OptimalDenoiser(train.float(), chunk_size=8, device="cpu")
    latents = torch.randn(10, *SHAPE, generator=gen, dtype=torch.float64)
    rho, smin, smax, steps = 7.0, 0.002, 80.0, 18
    i = torch.arange(steps, dtype=torch.float64)
    sigmas = (smax ** (1 / rho) + i / (steps - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
    samples = own_euler_sampler(den, latents, sigmas)
    assert (_distance_to_train(samples, train) < 1e-5).all()
    # more than one training point is reached: the samples do not collapse
    assert len(torch.unique(den.nearest_train_index(samples))) >= 3


@pytest.mark.parametrize("order", [1, 2])
def test_edm_sampler_returns_training_points(data, gen, order):
    sampling = pytest.importorskip("nbhelpers.sampling")
    train, _, _ = data
    den = OptimalDenoiser(train.float(), chunk_size=8, device="cpu")
    latents = torch.randn(10, *SHAPE, generator=gen)
    samples = sampling.edm_sampler(den, latents, num_steps=18, order=order)
    assert samples.dtype == torch.float64
    assert (_distance_to_train(samples, train) < 1e-5).all()


def test_errors(gen, data):
    train, x, _ = data
    with pytest.raises(ValueError, match="one-shot"):
        OptimalDenoiser((b for b in [train]), device="cpu")
    with pytest.raises(ValueError, match="uint8 or floating"):
        OptimalDenoiser(torch.zeros(4, *SHAPE, dtype=torch.int32), device="cpu")
    with pytest.raises(ValueError, match="img_shape"):
        OptimalDenoiser(torch.zeros(4, 48), device="cpu")
    with pytest.raises(ValueError, match="empty"):
        OptimalDenoiser(torch.zeros(0, *SHAPE), device="cpu")
    with pytest.raises(ValueError, match="no batches"):
        OptimalDenoiser(lambda: iter([]), device="cpu")
    den = OptimalDenoiser(train.reshape(N, -1), img_shape=SHAPE, device="cpu")
    assert den.img_shape == SHAPE
    with pytest.raises(ValueError, match="sigma has shape"):
        den(x, torch.ones(B + 1))
    with pytest.raises(ValueError, match="x has shape"):
        den(torch.zeros(2, 3, 5, 5), 1.0)
    bad = [train[:5], train[:5, :, :2]]
    stream = OptimalDenoiser(bad, device="cpu")
    with pytest.raises(ValueError, match="training batch"):
        stream(x, 1.0)
