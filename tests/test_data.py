"""nbhelpers.data: EDM data sets, resizing, CIFAR-10 and Fashion-MNIST loaders, teacher data sets."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from nbhelpers import data
from nbhelpers.data import (
    CIFAR10_URL,
    convert_dataset,
    edm_image_name,
    flat_rows,
    image_names,
    iter_image_batches,
    load_cifar10,
    load_fashion_mnist,
    load_images,
    model_space,
    read_idx,
    resize_images,
    synthetic_dataset,
    to_model,
    to_uint8,
    write_dataset,
)
from nbhelpers.download import DownloadError


def _images(n: int, c: int = 3, r: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, r, r), dtype=np.uint8)


def _png(img_chw: np.ndarray) -> bytes:
    hwc = img_chw.transpose(1, 2, 0)
    pil = PIL.Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
    buf = io.BytesIO()
    pil.save(buf, format="png")
    return buf.getvalue()


# ----------------------------------------------------------------------------
# Model space.


def test_to_model_and_back_is_exact():
    x = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    m = to_model(x)
    assert m.dtype == torch.float32 and m.min() == -1 and m.max() == 1
    assert np.array_equal(to_uint8(m).numpy(), x)
    assert np.array_equal(to_uint8(m.numpy().astype(np.float64)), x)
    assert torch.equal(to_model(torch.from_numpy(x)), m)
    assert to_uint8(torch.tensor([-3.0, 0.0, 3.0])).tolist() == [0, 128, 255]


def test_model_space_and_flat_rows():
    x = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    m64 = model_space(x, dtype=torch.float64)
    assert m64.dtype == torch.float64 and torch.allclose(m64.float(), to_model(x), rtol=0, atol=1e-7)
    floats = torch.linspace(-1, 1, 8).reshape(2, 1, 2, 2)
    assert model_space(floats) is floats  # model space already: no copy
    with pytest.raises(ValueError, match="uint8 or floating point"):
        model_space(torch.zeros(2, 3, dtype=torch.int32))
    assert flat_rows(x).shape == (1, 256) and flat_rows(x).dtype == torch.uint8
    assert flat_rows(floats, item_shape=(1, 2, 2)).shape == (2, 4)
    with pytest.raises(ValueError, match=r"train has shape \(2, 1, 2, 2\), expected \(N, 3, 2, 2\)"):
        flat_rows(floats, "train", item_shape=(3, 2, 2))
    with pytest.raises(ValueError, match="must be batched"):
        flat_rows(np.zeros(3, dtype=np.uint8))


# ----------------------------------------------------------------------------
# Writing and reading EDM data sets.


def test_edm_image_name():
    assert edm_image_name(0) == "00000/img00000000.png"
    assert edm_image_name(1234) == "00001/img00001234.png"
    assert edm_image_name(49999) == "00049/img00049999.png"


@pytest.mark.parametrize("suffix", [".zip", ""])
@pytest.mark.parametrize("channels", [1, 3])
def test_write_then_load_round_trip(tmp_path, suffix, channels):
    imgs = _images(5, c=channels)
    labels = np.array([3, 1, 4, 1, 5])
    dest = write_dataset(imgs, tmp_path / f"ds{suffix}", labels=labels)
    back, back_labels = load_images(dest)
    assert np.array_equal(back, imgs) and back_labels.dtype == np.int64
    assert back_labels.tolist() == labels.tolist()
    assert image_names(dest) == [edm_image_name(i) for i in range(5)]
    if suffix == ".zip":
        with zipfile.ZipFile(dest) as zf:
            meta = json.loads(zf.read("dataset.json"))
            with zf.open(edm_image_name(2)) as f, PIL.Image.open(f) as pil:
                assert pil.mode == ("L" if channels == 1 else "RGB")
    else:
        meta = json.loads((dest / "dataset.json").read_text())
    assert meta == {"labels": [[edm_image_name(i), int(v)] for i, v in enumerate(labels)]}
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]  # nothing temporary left


def test_vector_labels_names_and_no_labels(tmp_path):
    imgs = _images(3)
    vec = np.array([[0.5, 1.0], [0.0, 0.25], [1.0, 0.0]], dtype=np.float32)
    dest = write_dataset(
        torch.from_numpy(imgs), tmp_path / "v.zip", labels=vec, names=["b.png", "a/x.png", "c.png"]
    )
    back, labels = load_images(dest)
    assert image_names(dest) == ["a/x.png", "b.png", "c.png"]
    assert np.array_equal(back, imgs[[1, 0, 2]]) and labels.dtype == np.float32
    assert np.array_equal(labels, vec[[1, 0, 2]])
    plain = write_dataset(imgs, tmp_path / "plain.zip")
    assert load_images(plain)[1] is None
    with zipfile.ZipFile(plain) as zf:
        assert json.loads(zf.read("dataset.json")) == {"labels": None}


def test_folder_order_nested_subsets_and_batches(tmp_path):
    imgs = _images(10)
    names = [
        "b/1.png",
        "a/10.png",
        "a/2.png",
        "c.png",
        "a/b/0.png",
        "z.png",
        "d/e/f.png",
        "0.png",
        "a1.png",
        "b/0.png",
    ]
    root = tmp_path / "folder"
    for name, img in zip(names, imgs):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_png(img))
    (root / "notes.txt").write_text("not an image")
    (root / "dataset.json").write_text(json.dumps({"labels": [[n, i] for i, n in enumerate(names)]}))
    order = sorted(names)
    assert image_names(root) == order
    back, labels = load_images(root)
    perm = [names.index(n) for n in order]
    assert np.array_equal(back, imgs[perm]) and labels.tolist() == perm
    sub, sub_labels = load_images(root, max_images=4)
    assert np.array_equal(sub, back[:4]) and sub_labels.tolist() == perm[:4]
    batches = list(iter_image_batches(root, 4))
    assert [len(b) for b in batches] == [4, 4, 2] and all(b.dtype == np.uint8 for b in batches)
    assert np.array_equal(np.concatenate(batches), back)
    assert sum(len(b) for b in iter_image_batches(root, 3, max_images=5)) == 5


def test_jpeg_and_grey_images_are_read(tmp_path):
    root = tmp_path / "jpg"
    root.mkdir()
    PIL.Image.fromarray(np.full((6, 6, 3), 200, dtype=np.uint8)).save(root / "a.jpg", quality=95)
    PIL.Image.fromarray(np.full((6, 6, 3), 10, dtype=np.uint8)).save(root / "b.JPEG", quality=95)
    imgs, _ = load_images(root)
    assert imgs.shape == (2, 3, 6, 6)
    assert abs(int(imgs[0].mean()) - 200) <= 2 and abs(int(imgs[1].mean()) - 10) <= 2


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_images(tmp_path / "nowhere")
    bad_zip = tmp_path / "bad.zip"
    bad_zip.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="bad.zip"):
        load_images(bad_zip)
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"hello")
    with pytest.raises(ValueError, match="plain.bin"):
        image_names(plain)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="empty data set"):
        load_images(empty)
    only_json = tmp_path / "only_json.zip"
    with zipfile.ZipFile(only_json, "w") as zf:
        zf.writestr("dataset.json", '{"labels": null}')
    with pytest.raises(ValueError, match="empty data set"):
        load_images(only_json)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(_png(_images(1)[0]))
    (broken / "b.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match=r"b\.png.*unreadable"):
        load_images(broken)


@pytest.mark.parametrize("odd", [(3, 6), (1, 8)], ids=["size", "channels"])
def test_mixed_shapes_are_refused(tmp_path, odd):
    c, r = odd
    with zipfile.ZipFile(tmp_path / "mixed.zip", "w") as zf:
        zf.writestr("a.png", _png(_images(1, c=3, r=8)[0]))
        zf.writestr("b.png", _png(_images(1, c=c, r=r)[0]))
    with pytest.raises(ValueError, match=r"mixed.zip:b\.png.*mixed sizes or channel counts"):
        load_images(tmp_path / "mixed.zip")


@pytest.mark.parametrize(
    "entries, message",
    [
        ([["a.png", 0]], "no label for 1 image"),
        ([["a.png", 0], ["b.png", 1], ["c.png", 2]], "not images here"),
        ([["a.png", 0], ["a.png", 1], ["b.png", 1]], "distinct file names"),
        ([["a.png", 0], ["b.png", [1.0]]], "all integers"),
        ("oops", "list of"),
    ],
)
def test_label_mismatches_are_refused(tmp_path, entries, message):
    with zipfile.ZipFile(tmp_path / "lab.zip", "w") as zf:
        for name, img in zip(["a.png", "b.png"], _images(2)):
            zf.writestr(name, _png(img))
        zf.writestr("dataset.json", json.dumps({"labels": entries}))
    with pytest.raises(ValueError, match=message) as info:
        load_images(tmp_path / "lab.zip")
    assert "dataset.json" in str(info.value)


def test_write_errors_and_atomicity(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_dataset(np.zeros((2, 3, 4, 4), dtype=np.float32), tmp_path / "f.zip")
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        write_dataset(_images(2), tmp_path / "l.zip", labels=[0, 1, 2])
    with pytest.raises(ValueError, match="empty"):
        write_dataset(np.zeros((0, 3, 4, 4), dtype=np.uint8), tmp_path / "e.zip")

    def bad_stream():
        yield _images(2, r=8)
        yield _images(2, r=4)

    with pytest.raises(ValueError, match="mixed sizes"):
        write_dataset(bad_stream(), tmp_path / "s.zip")
    with pytest.raises(ValueError, match="mixed sizes"):
        write_dataset(bad_stream(), tmp_path / "s_dir")
    assert list(tmp_path.iterdir()) == []  # no partial output, no temporaries

    folder = write_dataset(_images(2), tmp_path / "dir")
    with pytest.raises(FileExistsError, match="not empty"):
        write_dataset(_images(3), folder)
    write_dataset(_images(3, seed=9), folder, overwrite=True)
    assert np.array_equal(load_images(folder)[0], _images(3, seed=9))
    zipped = write_dataset(_images(2), tmp_path / "z.zip")
    write_dataset(_images(1, seed=4), zipped)  # zips are replaced, as EDM's dataset_tool does
    assert np.array_equal(load_images(zipped)[0], _images(1, seed=4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "z.zip"]


# ----------------------------------------------------------------------------
# Resizing and conversion.


@pytest.mark.parametrize("size, target", [(32, 16), (28, 14), (28, 7), (30, 10)])
def test_area_resize_matches_pillow_box_and_torch_area(size, target):
    imgs = _images(4, c=3, r=size, seed=size)
    got = resize_images(imgs, target)
    assert got.shape == (4, 3, target, target) and got.dtype == np.uint8
    pil = np.stack(
        [
            np.asarray(PIL.Image.fromarray(im.transpose(1, 2, 0)).resize((target, target), PIL.Image.BOX))
            for im in imgs
        ]
    ).transpose(0, 3, 1, 2)
    assert np.abs(got.astype(int) - pil.astype(int)).max() <= 1
    area = torch.nn.functional.interpolate(torch.from_numpy(imgs).double(), size=target, mode="area")
    assert np.abs(got - area.numpy()).max() <= 0.5 + 1e-9


def test_area_resize_non_integer_factor_preserves_mean_and_constants():
    flat = np.full((2, 1, 28, 28), 77, dtype=np.uint8)
    assert (resize_images(flat, 16) == 77).all() and (resize_images(flat, 9) == 77).all()
    imgs = _images(8, c=1, r=28)
    small = resize_images(imgs, 16)
    assert abs(small.astype(float).mean() - imgs.astype(float).mean()) < 0.5
    # A half-black, half-white image keeps its edge where the area says: 28 -> 8, edge at 14 -> 4.
    step = np.zeros((1, 1, 28, 28), dtype=np.uint8)
    step[..., 14:] = 255
    assert resize_images(step, 8)[0, 0, 0].tolist() == [0, 0, 0, 0, 255, 255, 255, 255]


def test_convert_folder_to_zip_with_subset_and_resolution(tmp_path):
    imgs = _images(7, r=16)
    src = write_dataset(imgs, tmp_path / "src", labels=list(range(7)))
    dest = convert_dataset(src, tmp_path / "out" / "small.zip", max_images=5, resolution=8)
    got, labels = load_images(dest)
    assert np.array_equal(got, resize_images(imgs[:5], 8)) and labels.tolist() == [0, 1, 2, 3, 4]
    assert image_names(dest) == [edm_image_name(i) for i in range(5)]
    same = convert_dataset(dest, tmp_path / "copy", max_images=3)
    assert np.array_equal(load_images(same)[0], got[:3])
    with pytest.raises(FileNotFoundError, match="absent"):
        convert_dataset(tmp_path / "absent", tmp_path / "x.zip")


# ----------------------------------------------------------------------------
# CIFAR-10.


def _py2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR batch pickled as Python 2 did (protocol 2, byte strings, numpy.core globals)."""

    def s(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)

    def i(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    # numpy.dtype("u1") with its state (3, "|", None, None, None, -1, -1, 0).
    dtype = b"".join(
        [b"cnumpy\ndtype\n", s(b"u1"), b"\x89\x88\x87R", b"(K\x03", s(b"|"), b"NNN", i(-1), i(-1), b"K\x00tb"]
    )
    # _reconstruct(ndarray, (0,), "b") with state (1, shape, dtype, False, raw bytes).
    array = b"".join([
        b"cnumpy.core.multiarray\n_reconstruct\n", b"cnumpy\nndarray\n", b"K\x00\x85", s(b"b"), b"\x87R",
        b"(K\x01", i(data.shape[0]), i(data.shape[1]), b"\x86", dtype, b"\x89", s(data.tobytes()), b"tb",
    ])  # fmt: skip
    label_list = b"](" + b"".join(i(v) for v in labels) + b"e"
    body = s(b"batch_label") + s(b"training batch") + s(b"data") + array + s(b"labels") + label_list
    return b"\x80\x02}(" + body + b"u."


def _cifar_tarball(path: Path, per_batch: int = 3, py2: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    all_imgs, all_labels = [], []
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            flat = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, size=per_batch).tolist()
            if py2 and name == "data_batch_1":
                blob = _py2_pickle(flat, labels)
            else:
                blob = pickle.dumps({b"batch_label": b"x", b"data": flat, b"labels": labels}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            all_imgs.append(flat.reshape(-1, 3, 32, 32))
            all_labels.append(labels)
    return np.concatenate(all_imgs), np.concatenate(all_labels)


def test_load_cifar10_from_tarball(tmp_path):
    imgs, labels = _cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    x, y = load_cifar10(tmp_path / "cifar-10-python.tar.gz")
    assert x.shape == (15, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.array_equal(x, imgs[:15]) and y.tolist() == labels[:15].tolist()
    xt, yt = load_cifar10(tmp_path / "cifar-10-python.tar.gz", train=False)
    assert np.array_equal(xt, imgs[15:]) and yt.tolist() == labels[15:].tolist()
    xs, ys = load_cifar10(str(tmp_path / "cifar-10-python.tar.gz"), max_images=4)
    assert np.array_equal(xs, imgs[:4]) and len(ys) == 4
    dest = convert_dataset(tmp_path / "cifar-10-python.tar.gz", tmp_path / "c.zip", max_images=5)
    got, got_labels = load_images(dest)
    assert np.array_equal(got, imgs[:5]) and got_labels.tolist() == labels[:5].tolist()


def test_cifar_pickle_with_code_is_refused(tmp_path):
    evil = b"\x80\x02cos\nsystem\nU\x04true\x85R."
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(evil)
        tar.addfile(info, io.BytesIO(evil))
    with pytest.raises(ValueError, match=r"data_batch_1.*os\.system is not allowed"):
        load_cifar10(path)
    _cifar_tarball(tmp_path / "ok.tar.gz")
    with tarfile.open(tmp_path / "ok.tar.gz") as src, tarfile.open(tmp_path / "short.tar.gz", "w:gz") as dst:
        for m in src.getmembers():
            if m.name.endswith("data_batch_1"):
                dst.addfile(m, src.extractfile(m))
    with pytest.raises(ValueError, match="no member 'data_batch_2'"):
        load_cifar10(tmp_path / "short.tar.gz")
    not_tar = tmp_path / "not.tar.gz"
    not_tar.write_bytes(b"nope")
    with pytest.raises(ValueError, match="not.tar.gz"):
        load_cifar10(not_tar)


def test_cifar_url_is_not_downloaded_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("NBHELPERS_CACHE", str(tmp_path / "cache"))
    assert CIFAR10_URL == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    with pytest.raises(DownloadError, match="not in the cache"):
        load_cifar10()


# ----------------------------------------------------------------------------
# Fashion-MNIST.


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    head = bytes([0, 0, codes[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    blob = head + arr.tobytes()
    path.write_bytes(gzip.compress(blob) if gz else blob)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_small_idx_files(tmp_path, gz):
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=6).astype(np.uint8)
    ext = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{ext}", imgs, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{ext}", labels, gz)
    x, y = load_fashion_mnist(tmp_path)
    assert x.shape == (6, 1, 28, 28) and np.array_equal(x[:, 0], imgs) and y.tolist() == labels.tolist()
    x14, _ = load_fashion_mnist(tmp_path, resolution=14, max_images=2)
    want = imgs[:2].reshape(2, 14, 2, 14, 2).astype(float).mean(axis=(2, 4))
    assert x14.shape == (2, 1, 14, 14) and np.abs(x14[:, 0] - want).max() <= 0.5
    x32, _ = load_fashion_mnist(tmp_path, resolution=32, channels=3)
    assert x32.shape == (6, 3, 32, 32) and np.array_equal(x32[:, 1, 2:30, 2:30], imgs)
    assert x32[:, :, :2].max() == 0 and np.array_equal(x32[:, 0], x32[:, 2])
    assert load_fashion_mnist(tmp_path, resolution=32, upscale="area")[0].shape == (6, 1, 32, 32)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path, train=False)
    dest = convert_dataset(tmp_path, tmp_path / "fm.zip", max_images=3, resolution=7)
    assert load_images(dest)[0].shape == (3, 1, 7, 7) and load_images(dest)[1].tolist() == labels[:3].tolist()


def test_idx_errors(tmp_path):
    good = np.zeros((2, 3), dtype=np.uint8)
    _write_idx(tmp_path / "ok", good, gz=False)
    assert read_idx(tmp_path / "ok").shape == (2, 3)
    ints = np.arange(4, dtype=">i4")
    _write_idx(tmp_path / "ints.gz", ints, gz=True)
    assert read_idx(tmp_path / "ints.gz").tolist() == [0, 1, 2, 3]
    (tmp_path / "magic").write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic.*bad IDX magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-1])
    with pytest.raises(ValueError, match="short.*implies"):
        read_idx(tmp_path / "short")
    (tmp_path / "badgz").write_bytes(b"\x1f\x8b" + b"\x00" * 10)
    with pytest.raises(ValueError, match="badgz.*gzip"):
        read_idx(tmp_path / "badgz")
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28), dtype=np.uint8), gz=False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, dtype=np.uint8), gz=False)
    with pytest.raises(ValueError, match="3 images but .* 2 labels"):
        load_fashion_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_fashion_mnist(tmp_path / "nowhere")


@pytest.mark.skipif(not Path(data.FASHION_MNIST_ROOT).is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files():
    x, y = load_fashion_mnist(train=False)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [1000] * 10
    xt, yt = load_fashion_mnist(train=True, max_images=50, resolution=8, channels=3)
    assert xt.shape == (50, 3, 8, 8) and len(yt) == 50 and 0 < xt.mean() < 255


# ----------------------------------------------------------------------------
# Teacher-generated data sets.


def test_synthetic_dataset_with_stand_in_generate(tmp_path, monkeypatch):
    calls = []

    def fake_generate(net, seeds, batch_size, device, output="uint8"):
        calls.append((list(seeds), batch_size, device, output))
        return torch.stack([torch.full((1, 4, 4), s, dtype=torch.uint8) for s in seeds])

    monkeypatch.setitem(sys.modules, "nbhelpers.sampling", types.SimpleNamespace(generate=fake_generate))
    dest = synthetic_dataset(object(), 5, tmp_path / "teacher.zip", batch_size=2, device="cpu")
    assert calls == [([0, 1, 2, 3, 4], 2, "cpu", "uint8")]
    imgs, labels = load_images(dest)
    assert labels is None and imgs[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]


def test_synthetic_dataset_nested_with_real_sampler(tmp_path):
    pytest.importorskip("nbhelpers.sampling")
    from nbhelpers.molrg import MoLRG

    net = MoLRG.create(2, 3, 4, 3, generator=0).denoiser()
    big = synthetic_dataset(net, 6, tmp_path / "n6.zip", batch_size=4, device="cpu")
    small = synthetic_dataset(net, 3, tmp_path / "n3", batch_size=2, device="cpu")
    assert np.array_equal(load_images(big, max_images=3)[0], load_images(small)[0])
    assert load_images(big)[0].shape == (6, 3, 4, 4)
