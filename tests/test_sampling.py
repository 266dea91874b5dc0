"""Tests for nbhelpers.sampling: seeded noise, time steps, the EDM sampler, image and noise export."""

from __future__ import annotations

import math
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from nbhelpers.sampling import (
    SeedNoise,
    edm_sampler,
    edm_sigmas,
    export_noise,
    generate,
    image_names,
    load_noise,
    parse_seeds,
    save_images,
    to_uint8,
)


class GaussianDenoiser(torch.nn.Module):
    """Exact denoiser of N(0, std^2) data: D(x; sigma) = x std^2 / (std^2 + sigma^2)."""

    def __init__(
        self, std, channels=1, resolution=2, label_dim=0, sigma_min=0.0, sigma_max=math.inf, out_dtype=None
    ):
        super().__init__()
        self.out_dtype = out_dtype  # None: the input's dtype; float32 mimics a network
        self.std = torch.as_tensor(std, dtype=torch.float64)
        self.img_channels, self.img_resolution, self.label_dim = channels, resolution, label_dim
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.calls = []

    def forward(self, x, sigma, class_labels=None):
        self.calls.append((float(torch.as_tensor(sigma).flatten()[0]), class_labels))
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        s2 = self.std.to(x.device) ** 2
        return (x * s2 / (s2 + sigma**2)).to(self.out_dtype or x.dtype)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


def ode_solution(latents, std, sigma_max=80.0):
    """Probability-flow ODE solution at sigma=0 from x_T = latents * sigma_max for Gaussian data."""
    return latents.double() * sigma_max * std / math.sqrt(std**2 + sigma_max**2)


def rel_err(x, ref):
    return ((x - ref).abs() / ref.abs()).max().item()


# ---------------------------------------------------------------- seeds and noise


def test_parse_seeds():
    assert parse_seeds("0-3,7,10-11") == [0, 1, 2, 3, 7, 10, 11]
    assert parse_seeds("5") == [5]
    assert parse_seeds(" 1 , 2-3") == [1, 2, 3]
    assert parse_seeds([4, 2]) == [4, 2]
    assert parse_seeds(range(3)) == [0, 1, 2]
    assert parse_seeds(9) == [9]
    assert len(parse_seeds("100000-109999")) == 10000
    for bad in ("a", "1-", "3-1", "1,,2", "-1"):
        with pytest.raises(ValueError):
            parse_seeds(bad)


def test_seed_noise_matches_one_generator_per_seed():
    noise = SeedNoise([3, 1 << 32 | 7], device="cpu").randn((2, 3))
    assert noise.shape == (2, 2, 3) and noise.dtype == torch.float32
    assert torch.equal(noise[0], torch.randn((2, 3), generator=torch.Generator().manual_seed(3)))
    assert torch.equal(noise[1], torch.randn((2, 3), generator=torch.Generator().manual_seed(7)))


def test_seed_noise_is_batch_invariant():
    size = (3, 4, 4)
    together = SeedNoise([10, 11, 12, 13]).randn(size)
    alone = torch.cat([SeedNoise([s]).randn(size) for s in [12, 10, 13, 11]])
    assert torch.equal(together[[2, 0, 3, 1]], alone)
    # Later draws (churn noise, labels) are also per seed.
    a, b = SeedNoise([5, 6]), SeedNoise([6])
    a.randn(size), b.randn(size)
    assert torch.equal(
        a.randn_like(torch.zeros(2, 2, dtype=torch.float64))[1], b.randn((2,), torch.float64)[0]
    )
    labels = SeedNoise(range(20)).randint(10)
    assert labels.shape == (20,) and labels.min() >= 0 and labels.max() < 10
    assert torch.equal(
        SeedNoise([3, 4]).randint(2, 5, size=(6,))[1], SeedNoise([4]).randint(2, 5, size=(6,))[0]
    )


def test_seed_noise_checks_batch_and_handles_empty():
    with pytest.raises(ValueError, match="3 seeds"):
        SeedNoise([0, 1, 2]).randn_like(torch.zeros(2, 1))
    assert SeedNoise([]).randn((2, 2)).shape == (0, 2, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seed_noise_cpu_draws_are_device_independent():
    cpu = SeedNoise([0, 1], device="cpu").randn((3, 8, 8))
    cuda = SeedNoise([0, 1], device="cuda").randn((3, 8, 8))
    assert cuda.device.type == "cuda" and torch.equal(cuda.cpu(), cpu)
    native = SeedNoise([0, 1], device="cuda", noise_device=None).randn((3, 8, 8))
    assert not torch.equal(native.cpu(), cpu)  # CUDA generators have their own stream
    edm_style = torch.stack(
        [
            torch.randn((3, 8, 8), generator=torch.Generator("cuda").manual_seed(s), device="cuda")
            for s in (0, 1)
        ]
    )
    assert torch.equal(native, edm_style)


# ---------------------------------------------------------------- time steps


def test_edm_sigmas():
    s = edm_sigmas()
    assert s.shape == (19,) and s.dtype == torch.float64
    assert s[0].item() == pytest.approx(80) and s[17].item() == pytest.approx(0.002) and s[18] == 0
    assert (s[1:] < s[:-1]).all()
    # rho = 1 is uniform spacing in sigma.
    assert torch.allclose(
        edm_sigmas(5, 1.0, 5.0, rho=1)[:-1], torch.tensor([5.0, 4, 3, 2, 1], dtype=torch.float64)
    )
    # The middle level for rho = 7 is the midpoint in sigma^(1/7).
    mid = ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7
    assert edm_sigmas(3)[1].item() == pytest.approx(mid, rel=1e-12)
    # Clamping to the net's range, and a single step.
    net = GaussianDenoiser(0.5, sigma_min=0.02, sigma_max=50.0)
    c = edm_sigmas(net=net)
    assert c[0].item() == pytest.approx(50) and c[17].item() == pytest.approx(0.02)
    assert edm_sigmas(1).tolist() == [80.0, 0.0]
    assert edm_sigmas(dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError):
        edm_sigmas(0)
    with pytest.raises(ValueError):
        edm_sigmas(sigma_min=10, sigma_max=1)


# ---------------------------------------------------------------- sampler


def test_heun_step_formula_by_hand():
    net = GaussianDenoiser(1.0)
    lat = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]]])
    # sigma 2 -> 1 with std 1: d(2) = 0.4 x, Euler x' = 0.6 x, d'(1) = 0.3 x, Heun x = x - (0.4+0.3)/2 x.
    x = edm_sampler(net, lat, sigmas=[2.0, 1.0])
    assert torch.allclose(x, 0.65 * 2 * lat.double(), rtol=1e-14)
    x1 = edm_sampler(net, lat, sigmas=[2.0, 1.0], order=1)
    assert torch.allclose(x1, 0.6 * 2 * lat.double(), rtol=1e-14)
    # The step to sigma = 0 is an Euler step: x -> D(x).
    x0 = edm_sampler(net, lat, sigmas=[2.0, 0.0])
    assert torch.allclose(x0, 2 * lat.double() / 5, rtol=1e-14)


def test_gaussian_ode_accuracy_and_convergence_order():
    std = 0.5
    net = GaussianDenoiser(std)
    lat = SeedNoise(range(4)).randn((1, 2, 2))
    exact = ode_solution(lat, std)

    def err(order, n):
        return rel_err(edm_sampler(net, lat, num_steps=n, order=order), exact)

    heun18, euler18 = err(2, 18), err(1, 18)
    # Measured: Heun 0.055, Euler 0.154 at 18 steps; Heun 6.1e-6 at 1000 steps.
    assert heun18 < 0.06
    assert euler18 > 2.5 * heun18
    assert err(2, 1000) < 1e-5
    # Second order: halving the step divides the error by ~4; Euler by ~2.
    assert 3.8 < err(2, 36) / err(2, 72) < 4.6
    assert 1.85 < err(1, 36) / err(1, 72) < 2.15


def test_sampler_calls_and_trajectory():
    net = GaussianDenoiser(0.5)
    lat = SeedNoise([0, 1]).randn((1, 2, 2))
    x, traj = edm_sampler(net, lat, num_steps=18, return_trajectory=True)
    assert x.dtype == torch.float64 and x.shape == lat.shape
    assert len(net.calls) == 2 * 18 - 1  # Heun everywhere but the last step
    sig = edm_sigmas(18)
    assert [t for t, _, _ in traj] == pytest.approx(sig[:-1].tolist(), rel=1e-12)
    t0, x0, d0 = traj[0]
    assert torch.equal(x0, lat.double() * 80) and d0.dtype == torch.float64
    net.calls.clear()
    edm_sampler(net, lat, num_steps=18, order=1)
    assert len(net.calls) == 18
    with pytest.raises(ValueError):
        edm_sampler(net, lat, order=3)
    with pytest.raises(ValueError):
        edm_sampler(net, lat, sigmas=[1.0, 2.0, 0.0])


def test_sampler_callback_sees_each_step_and_leaves_the_samples_unchanged():
    net = GaussianDenoiser(0.5)
    noise = SeedNoise([3, 4])
    lat = noise.randn((1, 2, 2))
    kw = dict(num_steps=6, S_churn=20, S_min=0.5, S_max=100)
    steps = []
    x = edm_sampler(net, lat, noise=noise, callback=steps.append, **kw)
    again = SeedNoise([3, 4])
    ref, traj = edm_sampler(net, again.randn((1, 2, 2)), noise=again, return_trajectory=True, **kw)
    assert torch.equal(x, ref)
    assert [s["i"] for s in steps] == list(range(6))
    assert set(steps[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    assert [s["sigma"] for s in steps] == edm_sigmas(6)[:-1].tolist()
    assert steps[0]["sigma_hat"] > steps[0]["sigma"] and steps[-1]["sigma_hat"] == steps[-1]["sigma"]
    for s, (sigma_hat, x_t, denoised) in zip(steps, traj):
        assert (
            s["sigma_hat"] == sigma_hat and torch.equal(s["x"], x_t) and torch.equal(s["denoised"], denoised)
        )


def test_churn_is_seeded_and_batch_invariant():
    net = GaussianDenoiser(0.5)
    kw = dict(num_steps=10, S_churn=40, S_min=0.05, S_max=50)
    with pytest.raises(ValueError, match="SeedNoise"):
        edm_sampler(net, torch.zeros(1, 1, 2, 2), S_churn=1)

    def run(seeds):
        noise = SeedNoise(seeds)
        return edm_sampler(net, noise.randn((1, 2, 2)), noise=noise, **kw)

    ab, b = run([7, 8]), run([8])
    assert torch.equal(ab[1:], b)
    assert torch.equal(run([7, 8]), ab)
    lat = SeedNoise([7, 8]).randn((1, 2, 2))
    assert not torch.allclose(ab, edm_sampler(net, lat, num_steps=10))
    assert torch.isfinite(ab).all()


# ---------------------------------------------------------------- generate and files


def test_to_uint8():
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    assert to_uint8(x).tolist() == [0, 0, 0, 128, 191, 255, 255]
    assert to_uint8(x).dtype == torch.uint8


def test_generate_batch_invariant_and_outputs(tmp_path):
    net = GaussianDenoiser(0.5, channels=3, resolution=4, out_dtype=torch.float32)
    seeds = [4, 5, 6, 7, 8]
    a = generate(net, seeds, batch_size=5, device="cpu", num_steps=6)
    b = generate(net, "8,4-7", batch_size=2, device="cpu", num_steps=6)
    assert a.shape == (5, 3, 4, 4) and a.dtype == torch.uint8 and a.device.type == "cpu"
    assert torch.equal(a[[4, 0, 1, 2, 3]], b)
    f = generate(net, seeds, batch_size=3, device="cpu", num_steps=6, output="float")
    assert f.dtype == torch.float64 and torch.equal(to_uint8(f), a)
    lat = SeedNoise(seeds).randn((3, 4, 4))
    assert torch.equal(f, edm_sampler(net, lat, num_steps=6))
    with pytest.raises(ValueError):
        generate(net, seeds, output="png")


def test_generate_class_labels():
    net = GaussianDenoiser(0.5, label_dim=4)
    generate(net, range(6), batch_size=4, device="cpu", num_steps=2)
    first = [c for _, c in net.calls]
    labels = torch.cat([first[0], first[3]])  # the first call of each batch (3 calls per batch)
    assert labels.shape == (6, 4) and torch.equal(labels.sum(1), torch.ones(6))
    net.calls.clear()
    generate(net, range(6), batch_size=6, device="cpu", num_steps=2)
    assert torch.equal(net.calls[0][1], labels)
    net.calls.clear()
    generate(net, range(3), device="cpu", num_steps=2, class_labels=2)
    assert net.calls[0][1].argmax(1).tolist() == [2, 2, 2]
    net.calls.clear()
    generate(net, range(3), batch_size=2, device="cpu", num_steps=2, class_labels=torch.tensor([0, 3, 1]))
    assert torch.cat([net.calls[0][1], net.calls[3][1]]).argmax(1).tolist() == [0, 3, 1]
    with pytest.raises(ValueError):
        generate(GaussianDenoiser(0.5), [0], device="cpu", class_labels=1)


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_save_images_folder_and_zip(tmp_path, channels, mode):
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (3, channels, 5, 6), dtype=np.uint8))
    seeds = [0, 1001, 2]
    save_images(images, seeds, tmp_path / "dir")
    save_images(images, seeds, tmp_path / "sub", subdirs=True)
    save_images(images, seeds, tmp_path / "imgs.zip")
    assert image_names(seeds, subdirs=True) == ["000000/000000.png", "001000/001001.png", "000000/000002.png"]
    with zipfile.ZipFile(tmp_path / "imgs.zip") as zf:
        assert sorted(zf.namelist()) == ["000000.png", "000002.png", "001001.png"]
        for seed, image in zip(seeds, images):
            with zf.open(f"{seed:06d}.png") as f, Image.open(f) as im:
                assert im.mode == mode
                assert np.array_equal(
                    np.asarray(im).reshape(5, 6, channels).transpose(2, 0, 1), image.numpy()
                )
    for rel, image in zip(image_names(seeds, subdirs=True), images):
        with Image.open(tmp_path / "sub" / rel) as im:
            assert im.mode == mode
            assert np.array_equal(np.asarray(im).reshape(5, 6, channels).transpose(2, 0, 1), image.numpy())
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["000000.png", "000002.png", "001001.png"]
    assert not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(ValueError):
        save_images(images.float(), seeds, tmp_path / "bad")
    with pytest.raises(ValueError):
        save_images(images, seeds[:2], tmp_path / "bad")


def test_generate_writes_pngs(tmp_path):
    net = GaussianDenoiser(0.5, channels=3, resolution=4)
    imgs = generate(net, "3-5", device="cpu", num_steps=3, out=tmp_path / "out.zip")
    with zipfile.ZipFile(tmp_path / "out.zip") as zf, zf.open("000004.png") as f, Image.open(f) as im:
        assert np.array_equal(np.asarray(im).transpose(2, 0, 1), imgs[1].numpy())
    generate(net, [3], device="cpu", num_steps=3, out=tmp_path / "folder", output="float")
    assert (tmp_path / "folder" / "000003.png").is_file()


def test_export_load_noise_round_trip(tmp_path):
    path = export_noise("10-12,3", (3, 4, 4), tmp_path / "noise.npz")
    seeds, noise = load_noise(path)
    assert seeds == [10, 11, 12, 3] and noise.dtype == torch.float32 and noise.shape == (4, 3, 4, 4)
    assert torch.equal(noise, SeedNoise(seeds).randn((3, 4, 4)))
    net = GaussianDenoiser(0.5, channels=3, resolution=4)
    base = generate(net, seeds, device="cpu", num_steps=4, output="float")
    assert torch.equal(generate(net, seeds, device="cpu", num_steps=4, output="float", latents=noise), base)
    other = generate(net, seeds, device="cpu", num_steps=4, output="float", latents=-noise)
    assert torch.allclose(other, -base)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        load_noise(tmp_path / "bad.npz")
    np.savez(tmp_path / "wrong.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="wrong.npz"):
        load_noise(tmp_path / "wrong.npz")
    with pytest.raises(FileNotFoundError):
        load_noise(tmp_path / "missing.npz")
