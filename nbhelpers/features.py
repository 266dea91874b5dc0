"""Image descriptors for similarity scores: SSCD (as the authors used it) and model-free pixel features.

SSCD (facebookresearch/sscd-copy-detection) ships standalone TorchScript files returning unit-norm
copy-detection descriptors. The authors' ``edm/sscd.py`` feeds them uint8 images through
torchvision ``ToPILImage -> Resize((320, 320)) -> ToTensor -> Normalize(ImageNet)``: a PIL bilinear
resize of the 8-bit image, whose output is again 8-bit. ``pil_bilinear_resize`` reproduces that
resize with batched matrix products (Pillow's filter taps, 22-bit fixed-point weights and rounding,
horizontal pass then vertical): bit-exact for enlargements such as the authors' 32 -> 320, within
one grey level when shrinking (recent Pillow versions may run the vertical pass first then).

A ``FeatureSet`` keeps descriptors with the seeds (or file names) they belong to, so that scores can
pair samples by seed; it is stored as ``.npz`` whose ``features`` key is the authors' format.
"""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_path
from .data import flat_rows, image_names, iter_image_batches, model_space
from .devices import default_device
from .download import resolve

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SSCD",
    "SSCD_DISC_LARGE_URL",
    "SSCD_DISC_MIXUP_URL",
    "SSCD_URLS",
    "FeatureSet",
    "extract_features",
    "pil_bilinear_resize",
    "pixel_features",
    "seeds_from_names",
]

SSCD_DISC_LARGE_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_large.torchscript.pt"
SSCD_DISC_MIXUP_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt"
SSCD_URLS = {"sscd_disc_large": SSCD_DISC_LARGE_URL, "sscd_disc_mixup": SSCD_DISC_MIXUP_URL}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_PREC = 22  # Pillow's fixed-point precision for 8-bit resampling (32 - 8 - 2 bits)


def _as_uint8_images(images: Any, what: str = "images") -> torch.Tensor:
    """uint8 images (N, C, H, W) as a tensor, C in {1, 3}; anything else is a ValueError."""
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what} must be a uint8 array or tensor (N, C, H, W), got {type(images).__name__}")
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[1] not in (1, 3):
        raise ValueError(
            f"{what} must be uint8 (N, C, H, W) with C = 1 or 3, got {t.dtype} {tuple(t.shape)}; "
            "convert model-space images with nbhelpers.data.to_uint8"
        )
    return t


@functools.lru_cache(maxsize=32)
def _pil_bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64 matrix of Pillow's fixed-point bilinear weights (integers, scale 2^22)."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the triangle filter's support is 1
    mat = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as the C cast
        hi = min(int(center + support + 0.5), n_in)
        taps = np.arange(lo, hi)
        w = np.clip(1.0 - np.abs((taps - center + 0.5) / filterscale), 0.0, None)
        if w.sum() != 0:
            w = w / w.sum()
        mat[i, lo:hi] = np.trunc(w * (1 << _PREC) + np.where(w < 0, -0.5, 0.5))
    return torch.from_numpy(mat)


def pil_bilinear_resize(images: torch.Tensor | np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize uint8 images (N, C, H, W) to ``size`` (H', W') as PIL's 8-bit BILINEAR resize does.

    Returns float64 (N, C, H', W') holding integers in [0, 255]: equal to
    ``PIL.Image.resize((W', H'), BILINEAR)`` of each image when enlarging, within 1 when shrinking.
    """
    t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    out_h, out_w = (size, size) if isinstance(size, int) else size
    if t.device.type == "mps":  # the fixed-point sums need float64, which MPS lacks
        t = t.cpu()
    x = t.to(torch.float64)
    half, unit = float(1 << (_PREC - 1)), float(1 << _PREC)
    if x.shape[-1] != out_w:  # horizontal pass first, rounded to 8 bits as Pillow stores it
        k = _pil_bilinear_matrix(x.shape[-1], out_w).to(x.device)
        x = torch.floor((x @ k.T + half) / unit).clamp_(0, 255)
    if x.shape[-2] != out_h:
        k = _pil_bilinear_matrix(x.shape[-2], out_h).to(x.device)
        x = torch.floor((k @ x + half) / unit).clamp_(0, 255)
    return x


class SSCD:
    """An SSCD TorchScript descriptor: uint8 images (N, C, H, W) -> (N, F) float32 unit-norm CPU tensor.

    ``path_or_url`` is a local file, a URL, or a name in ``SSCD_URLS`` ('sscd_disc_large', the
    authors' choice, or 'sscd_disc_mixup'). URLs come from the download cache; they are fetched only
    when ``download=True``. Preprocessing follows the authors: grayscale replicated to RGB, PIL
    bilinear resize of the 8-bit image to ``resize`` x ``resize`` (None: keep the size), to [0, 1],
    ImageNet mean/std normalisation.
    """

    def __init__(
        self,
        path_or_url: str | os.PathLike = "sscd_disc_large",  # file, URL or a name in SSCD_URLS
        device: str | torch.device | None = None,            # where the model runs (default: CUDA if present)
        resize: int | None = 320,                            # square input size; None keeps the images' size
        batch_size: int = 64,                                # images per forward pass
        download: bool = False,                              # fetch a URL that is not cached yet
    ):  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.source = SSCD_URLS.get(str(path_or_url), str(path_or_url))
        self.device = default_device(device)
        self.resize = resize
        self.batch_size = int(batch_size)
        path = resolve(self.source, download=download)
        try:
            with warnings.catch_warnings():  # SSCD ships TorchScript only; torch marks jit.load deprecated
                warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
                self.model = torch.jit.load(str(path), map_location=self.device)
        except (RuntimeError, ValueError, OSError) as e:
            raise ValueError(f"{path}: not a loadable TorchScript model ({e})") from e
        self.model.eval()
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).reshape(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).reshape(1, 3, 1, 1)

    def preprocess(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 (N, C, H, W) -> the model's float32 input (N, 3, R, R) on the model's device."""
        x = _as_uint8_images(images).to(self.device)
        if self.resize is not None:
            x = pil_bilinear_resize(x, self.resize)
        x = x.to(self.device, torch.float32) / 255
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self._mean) / self._std

    @torch.no_grad()
    def __call__(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        images = _as_uint8_images(images)
        if len(images) == 0:
            raise ValueError("no images given")
        out = [
            F.normalize(self.model(self.preprocess(batch)).double(), dim=1).float().cpu()
            for batch in images.split(self.batch_size)
        ]
        return torch.cat(out)

    def __repr__(self) -> str:
        return (
            f"SSCD({self.source!r}, device={self.device}, resize={self.resize}, batch_size={self.batch_size})"
        )


def pixel_features(images: torch.Tensor | np.ndarray, center: bool = False) -> torch.Tensor:
    """Flattened images as (N, D) float32 unit vectors, so that dot products are pixel cosines.

    uint8 input is mapped to model space (``data.to_model``, mid-grey at 0); float input is taken as
    model space already. ``center`` subtracts each image's own mean first (the cosine becomes the
    Pearson correlation of the pixels, blind to brightness shifts). An all-zero vector stays zero.
    """
    x = model_space(flat_rows(images, "images"), dtype=torch.float64)
    if center:
        x = x - x.mean(1, keepdim=True)
    return F.normalize(x, dim=1).to(torch.float32)


_SEED_NAME = re.compile(r"^(?:img|seed)?[-_]?(\d+)$", re.IGNORECASE)


def seeds_from_names(names: Sequence[str]) -> np.ndarray | None:
    """Seeds parsed from EDM-style file names (``000123.png``, ``img00000123.png``, ``seed123.png``, any
    folder): int64 (N,), or None if a name does not parse or two names give the same seed."""
    seeds = []
    for name in names:
        m = _SEED_NAME.match(Path(str(name)).stem)
        if m is None:
            return None
        if len(m.group(1)) > 19 or int(m.group(1)) > 2**63 - 1:
            raise ValueError(f"{name}: the seed in this image name is larger than 2^63 - 1")
        seeds.append(int(m.group(1)))
    arr = np.asarray(seeds, dtype=np.int64)
    return arr if len(np.unique(arr)) == len(arr) else None


@dataclass
class FeatureSet:
    """Descriptors (N, F) float32 with the seeds (N,) int64 and/or names of the images they describe."""

    features: torch.Tensor
    seeds: torch.Tensor | None = None
    names: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        f = self.features
        f = torch.from_numpy(np.asarray(f)) if not isinstance(f, torch.Tensor) else f
        if f.ndim != 2 or (len(f) and f.shape[1] == 0):
            raise ValueError(f"features must be (N, F) with F >= 1, got shape {tuple(f.shape)}")
        if not (
            f.is_floating_point()
            or f.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
        ):
            raise ValueError(f"features must be numbers, got {f.dtype}")
        f = f.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(f).all()):
            bad = int((~torch.isfinite(f)).any(1).sum())
            raise ValueError(f"features contain NaN or infinite values ({bad} of {len(f)} rows)")
        self.features = f
        n = len(self.features)
        if self.seeds is not None:
            s = torch.as_tensor(
                np.asarray(self.seeds) if not isinstance(self.seeds, torch.Tensor) else self.seeds
            )
            if s.is_floating_point() or s.is_complex() or s.ndim != 1 or len(s) != n:
                raise ValueError(f"seeds must be integers of shape ({n},), got {s.dtype} {tuple(s.shape)}")
            self.seeds = s.to("cpu", torch.int64)
        if self.names is not None:
            self.names = [str(v) for v in self.names]
            if len(self.names) != n:
                raise ValueError(f"names has {len(self.names)} entries for {n} features")
        self.meta = dict(self.meta)

    def __len__(self) -> int:
        return len(self.features)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically as .npz: ``features``, optional ``seeds``/``names``, ``meta`` as JSON text."""
        try:
            meta = json.dumps(self.meta)
        except TypeError as e:
            raise ValueError(f"{path}: meta must be JSON-serialisable ({e})") from e
        arrays: dict[str, np.ndarray] = {"features": self.features.numpy(), "meta": np.array(meta)}
        if self.seeds is not None:
            arrays["seeds"] = self.seeds.numpy()
        if self.names is not None:
            arrays["names"] = np.array(self.names, dtype=np.str_)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureSet:
        """Read a file written by ``save`` (or the authors' ``sscd.py``: ``features`` only); no pickles."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such feature file")
        errors = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)
        try:
            z = np.load(path, allow_pickle=False)
        except errors as e:
            raise ValueError(f"{path}: not a readable feature file ({e})") from e
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError(f"{path}: not an .npz archive (a single .npy array?)")
        try:
            with z:
                if "features" not in z.files:
                    raise ValueError(f"no 'features' array (keys: {', '.join(z.files) or 'none'})")
                features = z["features"]
                if features.dtype.kind not in "fiub":
                    raise ValueError(f"'features' must be numbers, got {features.dtype}")
                if features.size == 0:
                    raise ValueError(f"no descriptors ('features' has shape {features.shape})")
                seeds = z["seeds"] if "seeds" in z.files else None
                names = z["names"].tolist() if "names" in z.files else None
                meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
                if not isinstance(meta, dict):
                    raise ValueError("'meta' is not a JSON object")
        except errors as e:
            raise ValueError(f"{path}: not a readable feature file ({e})") from e
        except RecursionError:
            raise ValueError(f"{path}: 'meta' is nested too deeply") from None
        try:
            return cls(features, seeds, names, meta)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


def _batches(
    images_or_path: Any, batch_size: int
) -> tuple[Iterable[np.ndarray | torch.Tensor], list[str] | None, str | None]:
    """(batches, names, source) for an array/tensor of images or a folder/zip data set."""
    if isinstance(images_or_path, (str, os.PathLike)):
        path = Path(images_or_path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such folder or zip of images")
        names = image_names(path)
        if not names:
            raise ValueError(f"{path}: no images found")
        return iter_image_batches(path, batch_size), names, str(path)
    t = (
        images_or_path
        if isinstance(images_or_path, torch.Tensor)
        else torch.from_numpy(np.asarray(images_or_path))
    )
    return t.split(batch_size), None, None


def extract_features(
    images_or_path: torch.Tensor | np.ndarray | str | os.PathLike,   # uint8 (N, C, H, W) or a folder/zip
    backend: str = "sscd",                                           # 'sscd' or 'pixel' (pixel cosine)
    model: SSCD | Callable[[torch.Tensor], torch.Tensor] | str | None = None,  # sscd: model, file, URL, name
    seeds: Sequence[int] | np.ndarray | torch.Tensor | None = None,  # default: parsed from file names
    names: Sequence[str] | None = None,                              # default: the data set's file names
    batch_size: int = 64,                                            # images per batch
    device: str | torch.device | None = None,                        # for a model built here
    center: bool = False,                                            # pixel: subtract each image's mean
) -> FeatureSet:  # fmt: skip
    """Descriptors of images or of a data set, with their seeds, as a ``FeatureSet``.

    A folder/zip is streamed batch by batch in data-set order; seeds are parsed from its file names
    (``000123.png``, ``img00000123.png``) when every name gives a distinct number. For the 'sscd'
    backend ``model`` is an ``SSCD`` (or any callable uint8 batch -> (n, F)), or a path/URL/name
    given to ``SSCD`` (a URL must be in the download cache); None means 'sscd_disc_large'.
    """
    if backend not in ("sscd", "pixel"):
        raise ValueError(f"backend must be 'sscd' or 'pixel', got {backend!r}")
    batches, file_names, source = _batches(images_or_path, batch_size)
    names = list(names) if names is not None else file_names
    meta: dict[str, Any] = {"backend": backend}
    if source is not None:
        meta["source"] = source
    if backend == "pixel":
        if model is not None:
            raise ValueError("the 'pixel' backend takes no model")
        fn: Callable = functools.partial(pixel_features, center=center)
        meta["center"] = center
    else:
        if model is None or isinstance(model, (str, os.PathLike)):
            model = SSCD(
                model if model is not None else "sscd_disc_large", device=device, batch_size=batch_size
            )
        fn = model
        if isinstance(model, SSCD):
            meta.update(model=model.source, resize=model.resize)
    feats = [torch.as_tensor(fn(b)).float().cpu() for b in batches]
    if not feats:
        raise ValueError("no images given")
    features = torch.cat(feats)
    if seeds is None and names is not None:
        try:
            seeds = seeds_from_names(names)
        except ValueError as e:
            raise ValueError(f"{source}: {e}" if source else str(e)) from None
    return FeatureSet(features, seeds, names, meta)
