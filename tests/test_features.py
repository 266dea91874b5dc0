"""Tests of the feature extractors and FeatureSet files, with small TorchScript stand-ins for SSCD."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from nbhelpers import features as Fe
from nbhelpers.download import DownloadError
from nbhelpers.features import SSCD, FeatureSet

# the stand-in models are TorchScript, as SSCD's files are; torch marks TorchScript deprecated
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")


class Echo(torch.nn.Module):
    """Returns its whole input, flattened, plus a constant 1 that pins the scale after L2 normalisation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.flatten(1), torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)


class TinyNet(torch.nn.Module):
    """A small conv net with SSCD's interface: (N, 3, H, W) -> (N, 8), not normalised."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 5.0 * self.conv(x).mean((2, 3)) + 1.0


def _script(module: torch.nn.Module, path) -> str:
    torch.jit.script(module).save(str(path))
    return str(path)


def authors_preprocess(img_chw: np.ndarray, size: int = 320) -> np.ndarray:
    """The authors' pipeline without torchvision: PIL bilinear resize of the image, /255, ImageNet norm."""
    hwc = img_chw.transpose(1, 2, 0)
    pil = PIL.Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
    arr = np.asarray(pil.resize((size, size), PIL.Image.BILINEAR), dtype=np.float64) / 255
    arr = np.repeat(arr[:, :, None], 3, 2) if arr.ndim == 2 else arr
    mean, std = np.array(Fe.IMAGENET_MEAN), np.array(Fe.IMAGENET_STD)
    return ((arr - mean) / std).transpose(2, 0, 1)


@pytest.mark.parametrize("channels", [3, 1])
def test_sscd_preprocessing_matches_the_authors_pipeline(tmp_path, channels):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, channels, 32, 32), dtype=np.uint8)
    sscd = SSCD(_script(Echo(), tmp_path / "echo.pt"), device="cpu")
    out = sscd(images)
    assert out.shape == (2, 3 * 320 * 320 + 1) and out.dtype == torch.float32
    torch.testing.assert_close(out.double().norm(dim=1), torch.ones(2, dtype=torch.float64))
    raw = out.double() / out[:, -1:].double()  # undo the L2 normalisation with the constant entry
    expect = np.stack([authors_preprocess(img) for img in images]).reshape(2, -1)
    np.testing.assert_allclose(raw[:, :-1].numpy(), expect, rtol=0, atol=1e-4)


def test_pil_bilinear_resize_is_exact_when_enlarging():
    rng = np.random.default_rng(1)
    for h, w, oh, ow in [(32, 32, 320, 320), (28, 28, 320, 320), (5, 17, 40, 33), (1, 3, 7, 3)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = np.asarray(PIL.Image.fromarray(img).resize((ow, oh), PIL.Image.BILINEAR)).transpose(2, 0, 1)
        out = Fe.pil_bilinear_resize(img.transpose(2, 0, 1)[None], (oh, ow))[0]
        assert np.array_equal(out.numpy(), ref), (h, w, oh, ow)
    img = rng.integers(0, 256, (64, 50, 3), dtype=np.uint8)  # shrinking: within one grey level
    ref = np.asarray(PIL.Image.fromarray(img).resize((20, 24), PIL.Image.BILINEAR)).transpose(2, 0, 1)
    out = Fe.pil_bilinear_resize(img.transpose(2, 0, 1)[None], (24, 20))[0].numpy()
    assert np.abs(out - ref).max() <= 1


def test_sscd_batches_and_normalises(tmp_path, gen):
    path = _script(TinyNet(), tmp_path / "tiny.pt")
    images = torch.randint(0, 256, (7, 3, 16, 16), generator=gen, dtype=torch.uint8)
    sscd = SSCD(path, device="cpu", resize=64, batch_size=3)
    out = sscd(images)
    assert out.shape == (7, 8) and out.device.type == "cpu"
    torch.testing.assert_close(out.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(out[4:5], sscd(images[4:5]))  # independent of batching
    model = torch.jit.load(path)
    with torch.no_grad():
        direct = torch.nn.functional.normalize(model(sscd.preprocess(images)), dim=1)
    torch.testing.assert_close(out, direct)
    assert "tiny.pt" in repr(sscd)


def test_sscd_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        SSCD(tmp_path / "missing.pt", device="cpu")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.pt"):
        SSCD(bad, device="cpu")
    with pytest.raises(DownloadError):  # not cached and not asked to download: no network used
        SSCD("sscd_disc_mixup", device="cpu")
    assert Fe.SSCD_URLS["sscd_disc_large"] == Fe.SSCD_DISC_LARGE_URL
    assert Fe.SSCD_DISC_LARGE_URL.endswith("sscd_disc_large.torchscript.pt")
    sscd = SSCD(_script(TinyNet(), tmp_path / "tiny.pt"), device="cpu")
    with pytest.raises(ValueError, match="uint8"):
        sscd(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        sscd(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))


def test_pixel_features():
    images = np.zeros((3, 1, 2, 2), dtype=np.uint8)
    images[0] = 255  # model space +1 everywhere
    images[1] = [[[0, 255], [255, 0]]]
    images[2] = 128  # almost mid-grey
    f = Fe.pixel_features(images)
    assert f.shape == (3, 4) and f.dtype == torch.float32
    torch.testing.assert_close(f[0], torch.full((4,), 0.5))
    torch.testing.assert_close(f[1], torch.tensor([-0.5, 0.5, 0.5, -0.5]))
    torch.testing.assert_close(f.norm(dim=1), torch.ones(3))
    centered = Fe.pixel_features(images, center=True)
    torch.testing.assert_close(centered[0], torch.zeros(4))  # a flat image has no pattern left
    floats = torch.tensor([[[3.0, 4.0]]])
    torch.testing.assert_close(Fe.pixel_features(floats), torch.tensor([[0.6, 0.8]]))


def test_seeds_from_names():
    assert Fe.seeds_from_names(
        ["000123.png", "000000/000124.png", "img00000125.png", "seed126.jpg"]
    ).tolist() == [
        123,
        124,
        125,
        126,
    ]
    assert Fe.seeds_from_names(["000123.png", "cat.png"]) is None
    assert Fe.seeds_from_names(["a/000001.png", "b/000001.png"]) is None  # repeated seed


def test_featureset_round_trip(tmp_path):
    fs = FeatureSet(np.random.default_rng(0).normal(size=(4, 5)), seeds=[10, 11, 12, 13], names=list("abcd"))
    fs.meta["backend"] = "pixel"
    path = fs.save(tmp_path / "feat.npz")
    back = FeatureSet.load(path)
    assert torch.equal(back.features, fs.features) and back.features.dtype == torch.float32
    assert back.seeds.dtype == torch.int64 and back.seeds.tolist() == [10, 11, 12, 13]
    assert back.names == list("abcd") and back.meta == {"backend": "pixel"}
    assert len(back) == 4
    FeatureSet(torch.zeros(2, 3)).save(tmp_path / "plain")  # no .npz suffix needed
    plain = FeatureSet.load(tmp_path / "plain")
    assert plain.seeds is None and plain.names is None and plain.meta == {}
    # the authors' files hold only 'features'
    np.savez(tmp_path / "authors.npz", features=np.ones((3, 2), dtype=np.float32))
    assert FeatureSet.load(tmp_path / "authors.npz").features.shape == (3, 2)


def test_featureset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        FeatureSet.load(tmp_path / "nope.npz")
    corrupt = tmp_path / "corrupt.npz"
    FeatureSet(torch.ones(5, 5)).save(corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:60])
    with pytest.raises(ValueError, match="corrupt.npz"):
        FeatureSet.load(corrupt)
    np.save(tmp_path / "single.npy", np.ones(3))
    with pytest.raises(ValueError, match="not an .npz"):
        FeatureSet.load(tmp_path / "single.npy")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="text.npz"):
        FeatureSet.load(tmp_path / "text.npz")
    np.savez(tmp_path / "nofeat.npz", other=np.ones(3))
    with pytest.raises(ValueError, match="no 'features'"):
        FeatureSet.load(tmp_path / "nofeat.npz")
    np.savez(tmp_path / "pickled.npz", features=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickled.npz"):
        FeatureSet.load(tmp_path / "pickled.npz")
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        FeatureSet(torch.zeros(3))
    with pytest.raises(ValueError, match="seeds"):
        FeatureSet(torch.zeros(3, 2), seeds=[1, 2])
    with pytest.raises(ValueError, match="names"):
        FeatureSet(torch.zeros(3, 2), names=["a"])
    with pytest.raises(ValueError, match="JSON"):
        FeatureSet(torch.zeros(3, 2), meta={"x": object()}).save(tmp_path / "m.npz")


def test_extract_features_from_arrays_and_folders(tmp_path, gen):
    data = pytest.importorskip("nbhelpers.data")
    images = torch.randint(0, 256, (5, 3, 8, 8), generator=gen, dtype=torch.uint8)
    fs = Fe.extract_features(images, backend="pixel", seeds=[5, 6, 7, 8, 9], batch_size=2)
    torch.testing.assert_close(fs.features, Fe.pixel_features(images))
    assert fs.seeds.tolist() == [5, 6, 7, 8, 9] and fs.meta["backend"] == "pixel"
    # a folder of EDM-style sample names: seeds are parsed from them, order follows the data set
    folder = tmp_path / "samples"
    folder.mkdir()
    seeds = [100004, 100001, 100003, 100000, 100002]
    for seed, img in zip(seeds, images.numpy()):
        PIL.Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{seed:06d}.png")
    fs = Fe.extract_features(folder, backend="pixel", batch_size=2)
    assert fs.seeds.tolist() == sorted(seeds) and fs.meta["source"] == str(folder)
    order = np.argsort(seeds)
    torch.testing.assert_close(fs.features, Fe.pixel_features(images[torch.from_numpy(order)]))
    # SSCD backend from a TorchScript path; its features equal SSCD's own
    path = _script(TinyNet(), tmp_path / "tiny.pt")
    fs2 = Fe.extract_features(folder, backend="sscd", model=path, device="cpu", batch_size=3)
    torch.testing.assert_close(fs2.features, SSCD(path, device="cpu")(images[torch.from_numpy(order)]))
    assert fs2.meta["model"] == path and fs2.meta["resize"] == 320 and fs2.names[0] == "100000.png"
    # a zip data set written by nbhelpers.data has img%08d names: seeds 0..N-1
    data.write_dataset(images.numpy(), tmp_path / "ds.zip")
    assert Fe.extract_features(tmp_path / "ds.zip", backend="pixel").seeds.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="backend"):
        Fe.extract_features(images, backend="clip")
    with pytest.raises(ValueError, match="no model"):
        Fe.extract_features(images, backend="pixel", model=path)
    with pytest.raises(FileNotFoundError, match="missing"):
        Fe.extract_features(tmp_path / "missing", backend="pixel")
