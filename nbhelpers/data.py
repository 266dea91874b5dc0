"""Image data sets: EDM's folder/zip format, CIFAR-10 and Fashion-MNIST loaders, teacher data sets.

Images are uint8 arrays shaped (N, C, H, W). A data set on disk is a folder or a zip of PNG/JPEG
files (any depth), ordered by relative path as EDM's ``ImageFolderDataset`` orders them, with an
optional ``dataset.json`` holding ``{"labels": [[name, label], ...]}``. A nested subset of size N is
the first N images in that order (the authors' ``dataset_tool.py --max-images``).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import os
import shutil
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from . import safeload
from .atomic import atomic_path, remove_stale_tmp, staging_dir
from .download import resolve

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
DATASET_JSON = "dataset.json"

_PNG_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


# ----------------------------------------------------------------------------
# Conversions between uint8 images and model space.


def to_model(
    x: np.ndarray | torch.Tensor,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> tensor in model space [-1, 1] (``x / 127.5 - 1``) of ``dtype``.

    The one copy of this map in the package; :func:`to_uint8` is its inverse (EDM's quantisation).
    """
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    return t.to(device=device, dtype=dtype) / 127.5 - 1


def model_space(
    x: np.ndarray | torch.Tensor,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Images as a model-space tensor of ``dtype``: uint8 mapped by :func:`to_model`, floating point
    taken as model space already (only cast); any other dtype is an error."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dtype == torch.uint8:
        return to_model(t, device, dtype)
    if not t.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point, got {t.dtype}")
    return t.to(device=device, dtype=dtype)


def flat_rows(
    x: np.ndarray | torch.Tensor, what: str = "images", item_shape: Sequence[int] | None = None
) -> torch.Tensor:
    """A batch (N, ...) as rows (N, D), left in its dtype (uint8 or floating point; arrays become
    tensors). With ``item_shape``, each item must hold ``prod(item_shape)`` values."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x)
    if t.ndim < 2:
        raise ValueError(f"{what} must be batched (N, ...), got shape {tuple(t.shape)}")
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise ValueError(f"{what} must be uint8 or floating point, got {t.dtype}")
    if item_shape is not None and math.prod(t.shape[1:]) != math.prod(item_shape):
        raise ValueError(
            f"{what} has shape {tuple(t.shape)}, expected (N, {', '.join(map(str, item_shape))})"
        )
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def to_uint8(x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Model-space images in [-1, 1] -> uint8 with EDM's quantisation (x * 127.5 + 128, clipped).

    A tensor gives a tensor (same device), an array gives an array.
    """
    if isinstance(x, torch.Tensor):
        x = x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)
        return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)
    return (np.asarray(x, dtype=np.float64) * 127.5 + 128).clip(0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------
# Reading EDM-style data sets (folder or zip).


def _image_extensions() -> set[str]:
    PIL.Image.init()
    return {ext.lower() for ext, fmt in PIL.Image.registered_extensions().items() if fmt in PIL.Image.OPEN}


class _ImageSource:
    """A folder or zip of images: sorted image names, raw bytes of a member, the labels file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self._zip: zipfile.ZipFile | None = None
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such file or directory")
        if self.path.is_dir():
            all_names = {
                Path(os.path.relpath(os.path.join(root, f), self.path)).as_posix()
                for root, _dirs, files in os.walk(self.path)
                for f in files
            }
        else:
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as e:
                raise ValueError(f"{self.path}: not a folder and not a readable zip archive ({e})") from e
            all_names = {n for n in self._zip.namelist() if not n.endswith("/")}
        exts = _image_extensions()
        self.names = sorted(n for n in all_names if os.path.splitext(n)[1].lower() in exts)
        self.has_json = DATASET_JSON in all_names
        if not self.names:
            self.close()
            raise ValueError(f"{self.path}: empty data set (no image files found)")

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            try:
                return self._zip.read(name)
            except (
                zipfile.BadZipFile,
                OSError,
                KeyError,
                EOFError,
                zlib.error,
                NotImplementedError,
                RuntimeError,
            ) as e:
                raise ValueError(f"{self.path}: cannot read member {name!r} ({type(e).__name__}: {e})") from e
        return (self.path / name).read_bytes()

    def where(self, name: str) -> str:
        return f"{self.path}:{name}" if self._zip is not None else str(self.path / name)

    def decode(self, name: str) -> np.ndarray:
        """One image as uint8 (C, H, W)."""
        try:
            with PIL.Image.open(io.BytesIO(self.read(name))) as img:
                arr = np.asarray(_plain_mode(img))
        except PIL.Image.DecompressionBombError as e:
            raise ValueError(f"{self.where(name)}: image too large ({e})") from e
        except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError, zlib.error) as e:
            raise ValueError(f"{self.where(name)}: unreadable image ({e})") from e
        if arr.dtype != np.uint8:
            raise ValueError(f"{self.where(name)}: not an 8-bit image (pixel type {arr.dtype})")
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def labels(self) -> np.ndarray | None:
        """Labels aligned with ``names`` (int64 (N,) or float32 (N, L)) or None, checked with the images."""
        if not self.has_json:
            return None
        where = self.where(DATASET_JSON)
        try:
            meta = json.loads(self.read(DATASET_JSON).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
        except RecursionError:
            raise ValueError(f"{where}: nested too deeply") from None
        if not isinstance(meta, dict) or "labels" not in meta:
            raise ValueError(f"{where}: expected an object with a 'labels' entry")
        entries = meta["labels"]
        if entries is None:
            return None
        if not isinstance(entries, list) or not all(isinstance(e, list) and len(e) == 2 for e in entries):
            raise ValueError(f"{where}: 'labels' must be a list of [file name, label] pairs")
        table = {str(name).replace("\\", "/"): label for name, label in entries}
        if len(table) != len(entries):
            raise ValueError(
                f"{where}: {len(entries)} label entries but only {len(table)} distinct file names"
            )
        missing = [n for n in self.names if n not in table]
        extra = sorted(set(table) - set(self.names))
        if missing:
            raise ValueError(f"{where}: no label for {len(missing)} image(s), e.g. {missing[0]!r}")
        if extra:
            raise ValueError(
                f"{where}: labels for {len(extra)} file(s) that are not images here, e.g. {extra[0]!r}"
            )
        values = [table[n] for n in self.names]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            bad = [(n, v) for n, v in zip(self.names, values) if not 0 <= v < 2**31]
            if bad:
                raise ValueError(
                    f"{where}: class labels must be non-negative integers, got {bad[0][1]} for {bad[0][0]!r}"
                )
            return np.asarray(values, dtype=np.int64)
        if all(isinstance(v, list) for v in values):
            try:
                arr = np.asarray(values, dtype=np.float32)
            except (ValueError, TypeError, RecursionError) as e:
                raise ValueError(f"{where}: label vectors of different lengths or types ({e})") from e
            if arr.ndim == 2:
                return arr
        raise ValueError(f"{where}: labels must be all integers or all equal-length lists of numbers")

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


# Image modes stored as something other than plain channels, and what they are converted to.
_CONVERT_MODES = {
    "P": "RGB",
    "PA": "RGBA",
    "CMYK": "RGB",
    "YCbCr": "RGB",
    "LAB": "RGB",
    "HSV": "RGB",
    "RGBX": "RGB",
    "RGBa": "RGBA",
    "La": "LA",
    "1": "L",
}


def _plain_mode(img: PIL.Image.Image) -> PIL.Image.Image:
    """``img`` with plain channels: palette images become their colours (RGBA if the palette has
    transparency), CMYK and other colour spaces RGB, bilevel L; LA stays two channels."""
    mode = img.mode
    if mode == "P" and "transparency" in img.info:
        return img.convert("RGBA")
    if mode in _CONVERT_MODES:
        return img.convert(_CONVERT_MODES[mode])
    return img


@contextlib.contextmanager
def _open_source(path: str | os.PathLike) -> Iterator[_ImageSource]:
    src = _ImageSource(path)
    try:
        yield src
    finally:
        src.close()


def image_names(path: str | os.PathLike) -> list[str]:
    """Relative names (``/`` separated) of the images in a folder or zip, in data-set order."""
    with _open_source(path) as src:
        return list(src.names)


def _check_max_images(max_images: int | None) -> None:
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be positive or None, got {max_images}")


def iter_image_batches(
    path: str | os.PathLike, batch_size: int, max_images: int | None = None
) -> Iterator[np.ndarray]:
    """Stream the images of a folder or zip as uint8 batches (B, C, H, W), the last one possibly shorter.

    Only one batch is decoded at a time, so data sets larger than memory can be scanned.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    _check_max_images(max_images)
    with _open_source(path) as src:
        names = src.names[:max_images]
        shape = None
        for start in range(0, len(names), batch_size):
            batch = []
            for name in names[start : start + batch_size]:
                img = src.decode(name)
                if shape is None:
                    shape = img.shape
                elif img.shape != shape:
                    raise ValueError(
                        f"{src.where(name)}: image shape (C, H, W) = {img.shape} differs from "
                        f"{shape} of {src.where(names[0])} (mixed sizes or channel counts)"
                    )
                batch.append(img)
            yield np.stack(batch)


def load_images(
    path: str | os.PathLike, max_images: int | None = None, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray | None]:
    """Load a folder or zip: uint8 images (N, C, H, W) and labels (int64 (N,), float32 (N, L) or None).

    ``max_images`` keeps the first N images (a nested subset); labels are validated against all images.
    """
    _check_max_images(max_images)
    with _open_source(path) as src:
        labels = src.labels()
    images = np.concatenate(list(iter_image_batches(path, batch_size, max_images)))
    if labels is not None:
        labels = labels[: len(images)]
    return images, labels


# ----------------------------------------------------------------------------
# Writing data sets in the layout of EDM's dataset_tool.py.


def edm_image_name(idx: int) -> str:
    """Archive name of image ``idx`` as EDM's dataset_tool writes it: ``00001/img00001234.png``."""
    return f"{idx // 1000:05d}/img{idx:08d}.png"


def _as_uint8_batch(batch: np.ndarray | torch.Tensor, dest: Path) -> np.ndarray:
    arr = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
    if arr.dtype != np.uint8:
        raise ValueError(f"{dest}: images must be uint8, got {arr.dtype} (use to_uint8 first)")
    if arr.ndim != 4 or arr.shape[1] not in _PNG_MODES:
        raise ValueError(f"{dest}: images must be shaped (N, C, H, W) with C in (1, 3, 4), got {arr.shape}")
    return arr


def _encode_png(img_chw: np.ndarray) -> bytes:
    c = img_chw.shape[0]
    hwc = img_chw.transpose(1, 2, 0)
    pil = PIL.Image.fromarray(hwc[:, :, 0] if c == 1 else np.ascontiguousarray(hwc), _PNG_MODES[c])
    buf = io.BytesIO()
    pil.save(buf, format="png", compress_level=0, optimize=False)
    return buf.getvalue()


def _label_json(label) -> int | list[float]:
    arr = np.asarray(label)
    if arr.ndim == 0:
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"scalar labels must be integers, got {arr.dtype}")
        return int(arr)
    return [float(v) for v in arr.reshape(-1)]


def write_dataset(
    images: np.ndarray | torch.Tensor | Iterable[np.ndarray | torch.Tensor],
    dest: str | os.PathLike,
    labels: Sequence | np.ndarray | torch.Tensor | None = None,
    names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write uint8 images (N, C, H, W), or an iterable of such batches, as an EDM data set.

    ``dest`` ending in ``.zip`` gives a zip (replaced atomically), anything else a folder (written
    beside it, then renamed; an existing non-empty folder needs ``overwrite=True``). Images are
    PNGs named ``edm_image_name(idx)`` unless ``names`` is given; ``dataset.json`` holds the labels
    (int or vector per image) or ``null``.
    """
    dest = Path(dest).expanduser()
    is_zip = dest.suffix.lower() == ".zip"
    if not is_zip and dest.exists():
        if not dest.is_dir():
            raise ValueError(f"{dest}: exists and is not a folder")
        if any(dest.iterdir()) and not overwrite:
            raise FileExistsError(f"{dest}: folder is not empty (pass overwrite=True to replace it)")
    names = _member_names(names, dest)
    batches = [images] if isinstance(images, (np.ndarray, torch.Tensor)) else images
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    members = _dataset_members(batches, dest, labels, names)
    if is_zip:
        with atomic_path(dest) as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
                for name, data in members:
                    zf.writestr(name, data)
        return dest
    _write_folder(members, dest)
    return dest


def _member_names(names: Sequence[str] | None, dest: Path) -> list[str] | None:
    """``names`` as checked relative PNG paths with forward slashes (None stays None)."""
    if names is None:
        return None
    names = [str(n).replace("\\", "/") for n in names]
    if len(set(names)) != len(names):
        raise ValueError(f"{dest}: duplicate image names")
    bad = [n for n in names if not n.lower().endswith(".png") or n.startswith("/") or ".." in n.split("/")]
    if bad:
        raise ValueError(f"{dest}: image names must be relative paths ending in .png, got {bad[0]!r}")
    return names


def _dataset_members(
    batches: Iterable, dest: Path, labels: Sequence | np.ndarray | None, names: list[str] | None
) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each PNG of the batches, then of ``dataset.json``; checked as they come."""
    idx = 0
    shape = None
    written: list[str] = []
    for batch in batches:
        arr = _as_uint8_batch(batch, dest)
        if shape is None:
            shape = arr.shape[1:]
        elif arr.shape[1:] != shape:
            raise ValueError(f"{dest}: batch of shape {arr.shape[1:]} differs from {shape} (mixed sizes)")
        for img in arr:
            if names is not None and idx >= len(names):
                raise ValueError(f"{dest}: more images than names ({len(names)})")
            name = names[idx] if names is not None else edm_image_name(idx)
            written.append(name)
            yield name, _encode_png(img)
            idx += 1
    if idx == 0:
        raise ValueError(f"{dest}: no images to write (empty data set)")
    if names is not None and idx != len(names):
        raise ValueError(f"{dest}: {idx} images but {len(names)} names")
    table = None
    if labels is not None:
        if len(labels) != idx:
            raise ValueError(f"{dest}: {idx} images but {len(labels)} labels")
        table = [[n, _label_json(lab)] for n, lab in zip(written, labels)]
    yield DATASET_JSON, json.dumps({"labels": table}).encode("utf-8")


def _write_folder(members: Iterable[tuple[str, bytes]], dest: Path) -> None:
    """Write the members into a fresh folder beside ``dest``, then put it in ``dest``'s place."""
    remove_stale_tmp(dest.parent)  # staging folders of writers that were killed
    tmp_dir = staging_dir(dest)
    try:
        for name, data in members:
            (tmp_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_dir / name).write_bytes(data)
        if dest.exists():
            trash = staging_dir(dest, "old")
            os.replace(dest, trash / dest.name)
            os.replace(tmp_dir, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp_dir, dest)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------
# Resizing.


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights: fraction of output pixel i covered by input pixel j (rows sum to 1)."""
    scale = n_in / n_out
    lo = np.arange(n_out)[:, None] * scale
    hi = lo + scale
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None)
    return overlap / scale


def resize_images(images: np.ndarray, resolution: int) -> np.ndarray:
    """Resize uint8 (N, C, H, W) to (N, C, resolution, resolution) by exact area averaging, batched.

    Each output pixel is the mean of the input area it covers (fractional pixels weighted by
    coverage), like OpenCV's INTER_AREA; for integer factors this equals Pillow's BOX filter.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {images.shape}")
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    h, w = images.shape[2:]
    if (h, w) == (resolution, resolution):
        return images.copy()
    a_h = _area_matrix(h, resolution).astype(np.float32)
    a_w = _area_matrix(w, resolution).astype(np.float32)
    out = np.empty(images.shape[:2] + (resolution, resolution), dtype=np.uint8)
    for start in range(0, len(images), 4096):
        chunk = images[start : start + 4096].astype(np.float32)
        res = np.einsum("ih,nchw,jw->ncij", a_h, chunk, a_w, optimize=True)
        out[start : start + 4096] = np.floor(res + 0.5).clip(0, 255).astype(np.uint8)
    return out


def _pad_images(images: np.ndarray, resolution: int) -> np.ndarray:
    h, w = images.shape[2:]
    if resolution < max(h, w):
        raise ValueError(f"cannot pad {h}x{w} images to the smaller size {resolution}")
    top, left = (resolution - h) // 2, (resolution - w) // 2
    out = np.zeros(images.shape[:2] + (resolution, resolution), dtype=images.dtype)
    out[:, :, top : top + h, left : left + w] = images
    return out


# ----------------------------------------------------------------------------
# CIFAR-10 (python tarball).


def _safe_unpickle(data: bytes, where: str):
    """A CIFAR-10 batch pickle read by :mod:`nbhelpers.safeload`: plain data and numeric numpy arrays only."""
    try:
        return safeload.load_pickle(
            data, where, {**safeload.plain_globals(), **safeload.numpy_globals()}, encoding="latin1"
        )
    except safeload.PickleError as e:
        raise ValueError(f"{e} (not a CIFAR-10 batch this reader accepts)") from None


def load_cifar10(
    path_or_url: str | os.PathLike | None = None,
    train: bool = True,
    download: bool = False,
    max_images: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from the python tarball: uint8 images (N, 3, 32, 32) and int64 labels (N,).

    ``train`` picks ``data_batch_1..5`` (50,000 images, in order) or ``test_batch`` (10,000). The
    default source is ``CIFAR10_URL``, fetched (into the cache) only when ``download`` is true.
    """
    _check_max_images(max_images)
    path = resolve(CIFAR10_URL if path_or_url is None else path_or_url, download=download)
    wanted = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    images, labels = [], []
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            for batch in wanted:
                where = f"{path}:{batch}"
                if batch not in members:
                    raise ValueError(f"{path}: no member {batch!r} (not the CIFAR-10 python tarball?)")
                f = tar.extractfile(members[batch])
                d = _safe_unpickle(f.read(), where)
                if not isinstance(d, dict):
                    raise ValueError(f"{where}: expected a dict, got {type(d).__name__}")
                d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
                data, labs = d.get("data"), d.get("labels")
                if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
                    raise ValueError(f"{where}: 'data' must be a uint8 array (N, 3072)")
                labs = np.asarray(labs) if isinstance(labs, list | np.ndarray) else None
                if labs is None or labs.ndim != 1 or (len(labs) and labs.dtype.kind not in "iu"):
                    raise ValueError(f"{where}: 'labels' must be a list of integers")
                if data.shape[1] != 3 * 32 * 32 or len(labs) != len(data):
                    raise ValueError(f"{where}: data {data.shape} and {len(labs)} labels do not match")
                images.append(data.reshape(-1, 3, 32, 32))
                labels.append(labs.astype(np.int64))
                if max_images is not None and sum(len(x) for x in images) >= max_images:
                    break
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable tar archive ({e})") from e
    return np.concatenate(images)[:max_images], np.concatenate(labels)[:max_images]


# ----------------------------------------------------------------------------
# Fashion-MNIST (IDX files).

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array, checking the header against the size."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: bad IDX magic number {raw[:4].hex() or '(empty)'}")
    ndim = raw[3]
    if ndim < 1 or len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, but the header {dims} implies {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(f"{root}: neither {stem} nor {stem}.gz found")


def load_fashion_mnist(
    root: str | os.PathLike = FASHION_MNIST_ROOT,
    train: bool = True,
    max_images: int | None = None,
    resolution: int | None = None,
    channels: int = 1,
    upscale: str = "pad",
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST (or MNIST) from IDX files: uint8 images (N, channels, R, R) and int64 labels (N,).

    ``resolution`` below 28 averages areas (``resize_images``); above 28 it zero-pads centred
    (``upscale="pad"``, e.g. 28 -> 32) or area-resizes (``upscale="area"``). ``channels=3``
    replicates the grey channel. ``max_images`` keeps the first N.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (Debian: apt install dataset-fashion-mnist)")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if upscale not in ("pad", "area"):
        raise ValueError(f"upscale must be 'pad' or 'area', got {upscale!r}")
    _check_max_images(max_images)
    prefix = "train" if train else "t10k"
    img_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    lab_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{img_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{lab_path}: expected labels (N,), got shape {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{img_path}: {len(images)} images but {lab_path} has {len(labels)} labels")
    images = images[:max_images, None]
    labels = labels[:max_images].astype(np.int64)
    if resolution is not None and resolution != images.shape[-1]:
        if resolution > max(images.shape[2:]) and upscale == "pad":
            images = _pad_images(images, resolution)
        else:
            images = resize_images(images, resolution)
    if channels == 3:
        images = np.repeat(images, 3, axis=1)
    return np.ascontiguousarray(images), labels


# ----------------------------------------------------------------------------
# Conversion (dataset_tool.py) and teacher-generated data sets.


def _is_cifar_tarball(path: Path) -> bool:
    return path.is_file() and tarfile.is_tarfile(path)


def _is_idx_folder(path: Path) -> bool:
    return path.is_dir() and any((path / f"train-images-idx3-ubyte{ext}").exists() for ext in ("", ".gz"))


TRANSFORMS = ("center-crop", "center-crop-wide")


def transform_image(img: np.ndarray, transform: str, width: int, height: int) -> np.ndarray | None:
    """EDM ``dataset_tool.py --transform`` of one uint8 image (C, H, W), grayscale made RGB, Lanczos resize.

    ``center-crop``: the centred square of the shorter side, resized to ``width`` x ``height``.
    ``center-crop-wide``: the centred band of aspect ``width``/``height``'s source rows, resized to
    ``width`` x ``height`` and pasted into the middle of a black ``width`` x ``width`` canvas; None
    (the image is skipped) when the source is narrower than ``width`` or the band lower than ``height``.
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    hwc = img.transpose(1, 2, 0)
    if hwc.shape[2] == 1:
        hwc = hwc.repeat(3, axis=2)
    h, w = hwc.shape[:2]
    if transform == "center-crop":
        c = min(h, w)
        hwc = hwc[(h - c) // 2 : (h + c) // 2, (w - c) // 2 : (w + c) // 2]
    else:
        band = int(np.round(width * h / w))
        if w < width or band < height:
            return None
        hwc = hwc[(h - band) // 2 : (h + band) // 2]
    out = np.asarray(
        PIL.Image.fromarray(np.ascontiguousarray(hwc[:, :, :3]), "RGB").resize(
            (width, height), PIL.Image.Resampling.LANCZOS
        )
    )
    if transform == "center-crop-wide":
        canvas = np.zeros((width, width, 3), dtype=np.uint8)
        canvas[(width - height) // 2 : (width + height) // 2] = out
        out = canvas
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def _transformed(
    images: Iterable[np.ndarray],
    labels: np.ndarray | None,
    transform: str,
    size: tuple[int, int],
    where: Path,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply ``transform_image`` to each image (any sizes), dropping skipped images and their labels."""
    kept, keep_idx = [], []
    for i, img in enumerate(images):
        out = transform_image(img, transform, *size)
        if out is not None:
            kept.append(out)
            keep_idx.append(i)
    if not kept:
        raise ValueError(f"{where}: every image is smaller than {size[0]}x{size[1]} ({transform} skips them)")
    if kept[0].shape[1] != kept[0].shape[2]:
        raise ValueError(
            f"{where}: images after {transform} are {kept[0].shape[2]}x{kept[0].shape[1]}, not square"
        )
    return np.stack(kept), None if labels is None else labels[keep_idx]


def convert_dataset(
    source: str | os.PathLike,
    dest: str | os.PathLike,
    max_images: int | None = None,
    resolution: int | tuple[int, int] | None = None,
    batch_size: int = 1024,
    overwrite: bool = False,
    transform: str | None = None,
) -> Path:
    """The authors' ``dataset_tool.py --source --dest --max-images``: the first N images as an EDM data set.

    ``source``: a folder or zip of images (labels kept), the CIFAR-10 python tarball (training
    split) or a folder of (Fashion-)MNIST IDX files (training split). ``resolution`` resizes
    square images by area averaging (``resize_images``); non-square sources are refused. With
    ``transform`` (``TRANSFORMS``, needs ``resolution`` = (width, height)) each image is cropped and
    resized as EDM's ``dataset_tool.py --transform`` does (:func:`transform_image`).
    """
    source = Path(source).expanduser()
    _check_max_images(max_images)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or directory")
    if transform is not None:
        if resolution is None:
            raise ValueError(f"--transform {transform} needs --resolution WxH")
        size = (resolution, resolution) if isinstance(resolution, int) else tuple(int(v) for v in resolution)
        if _is_idx_folder(source) or (
            source.is_file() and not zipfile.is_zipfile(source) and _is_cifar_tarball(source)
        ):
            loader = load_fashion_mnist if source.is_dir() else load_cifar10
            images, labels = _transformed(
                *loader(source, train=True, max_images=max_images), transform, size, source
            )
        else:
            with _open_source(source) as src:  # decoded one at a time: the sources may differ in size
                names, labels = src.names[:max_images], src.labels()
                labels = None if labels is None else labels[: len(names)]
                images, labels = _transformed((src.decode(n) for n in names), labels, transform, size, source)
        return write_dataset(images, dest, labels=labels, overwrite=overwrite)
    if isinstance(resolution, tuple):
        if resolution[0] != resolution[1]:
            raise ValueError(
                f"resolution {resolution[0]}x{resolution[1]} is not square (only --transform makes that)"
            )
        resolution = resolution[0]

    def fit(batch: np.ndarray) -> np.ndarray:
        if resolution is None:
            return batch
        if batch.shape[2] != batch.shape[3]:
            raise ValueError(f"{source}: images are {batch.shape[2]}x{batch.shape[3]}, not square")
        return resize_images(batch, resolution)

    if _is_idx_folder(source) or (
        source.is_file() and not zipfile.is_zipfile(source) and _is_cifar_tarball(source)
    ):
        if source.is_dir():
            images, labels = load_fashion_mnist(source, train=True, max_images=max_images)
        else:
            images, labels = load_cifar10(source, train=True, max_images=max_images)
        return write_dataset(fit(images), dest, labels=labels, overwrite=overwrite)

    with _open_source(source) as src:
        labels = src.labels()
        count = len(src.names[:max_images])
    if labels is not None:
        labels = labels[:count]
    batches = (fit(b) for b in iter_image_batches(source, batch_size, max_images))
    return write_dataset(batches, dest, labels=labels, overwrite=overwrite)


def synthetic_dataset(
    net: torch.nn.Module,
    n_images: int,
    dest: str | os.PathLike,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    overwrite: bool = False,
) -> Path:
    """The authors' teacher data set: images for seeds 0..n_images-1 from ``net``, written as a zip/folder.

    Nested subsets of it (first N images) are then exactly the teacher's samples for seeds 0..N-1.
    """
    from .sampling import generate  # sampling imports this module (to_uint8)

    if n_images < 1:
        raise ValueError(f"n_images must be positive, got {n_images}")
    images = generate(net, list(range(n_images)), batch_size, device, output="uint8")
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    return write_dataset(images, dest, overwrite=overwrite)
