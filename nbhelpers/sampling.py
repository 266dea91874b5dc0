"""Seeded sampling: per-seed noise, EDM time steps, the EDM Heun/Euler sampler, image export.

A sample depends only on its seed: every seed has its own ``torch.Generator`` (as EDM's
``StackedRandomGenerator``), so batch size and batch composition never change an image.

Noise device. CPU and CUDA generators produce different streams for the same seed. By default
(``noise_device="cpu"``) the noise is drawn on the CPU and moved to the compute device, so a seed
gives the same initial noise on a laptop and on a GPU node. ``noise_device=None`` draws on the
compute device itself; on CUDA that reproduces EDM's ``generate.py`` latents exactly.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
import os
import re
import shutil
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tqdm
from PIL import Image

from .atomic import atomic_path, atomic_write_text, check_writable, remove_stale_tmp
from .data import to_uint8
from .devices import default_device
from .safeload import PickleError, read_zip_member

__all__ = [
    "SeedNoise",
    "parse_seeds",
    "edm_sigmas",
    "edm_sampler",
    "generate",
    "save_images",
    "image_names",
    "export_noise",
    "load_noise",
]

Device = str | torch.device


class SeedNoise:
    """One generator per seed; draws are stacked along a leading batch axis of ``len(seeds)``.

    ``device`` is where results live; ``noise_device`` where they are drawn (``"cpu"``: identical on
    every machine; ``None``: on ``device``, as EDM does). Seeds are reduced modulo 2**32 like EDM.
    """

    def __init__(self, seeds: Iterable[int], device: Device = "cpu", noise_device: Device | None = "cpu"):
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.noise_device = self.device if noise_device is None else torch.device(noise_device)
        self.generators = [torch.Generator(self.noise_device).manual_seed(s % (1 << 32)) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def _stack(self, draw: Callable[[torch.Generator], torch.Tensor], size, dtype, device) -> torch.Tensor:
        if not self.generators:
            return torch.empty((0, *size), dtype=dtype, device=device)
        return torch.stack([draw(g) for g in self.generators]).to(device)

    def randn(self, size: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise shaped ``(len(seeds), *size)`` on ``device``."""
        size = tuple(int(s) for s in size)
        draw = lambda g: torch.randn(size, generator=g, dtype=dtype, device=self.noise_device)
        return self._stack(draw, size, dtype, self.device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise with the shape, dtype and device of ``x`` (``x.shape[0] == len(seeds)``)."""
        if x.shape[0] != len(self.seeds):
            raise ValueError(f"randn_like: batch of {x.shape[0]} but {len(self.seeds)} seeds")
        size = tuple(x.shape[1:])
        draw = lambda g: torch.randn(size, generator=g, dtype=x.dtype, device=self.noise_device)
        return self._stack(draw, size, x.dtype, x.device)

    def randint(
        self, low: int, high: int | None = None, size: Sequence[int] = (), dtype: torch.dtype = torch.int64
    ) -> torch.Tensor:
        """Integers in ``[low, high)`` (``[0, low)`` if ``high`` is None), shaped ``(len(seeds), *size)``."""
        if high is None:
            low, high = 0, low
        size = tuple(int(s) for s in size)
        draw = lambda g: torch.randint(low, high, size, generator=g, dtype=dtype, device=self.noise_device)
        return self._stack(draw, size, dtype, self.device)


_RANGE = re.compile(r"^(\d+)-(\d+)$")
MAX_SEEDS = 10_000_000  # seeds in one list (a list of 10^7 ints already takes ~0.4 GB)
MAX_SEED = 2**63 - 1  # seeds are stored as int64 (feature files, noise files)


def parse_seeds(spec: str | int | Iterable[int]) -> list[int]:
    """``"0-3,7,10-11"`` -> ``[0, 1, 2, 3, 7, 10, 11]`` (inclusive ranges, order kept, as EDM).

    Integers and iterables of integers pass through as a list.
    """
    if isinstance(spec, int | np.integer):
        return [int(spec)]
    if not isinstance(spec, str):
        return [int(s) for s in spec]
    seeds: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = _RANGE.match(part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"seed range {part!r} in {spec!r} is reversed")
            if len(seeds) + hi - lo + 1 > MAX_SEEDS:
                raise ValueError(f"seed list {spec!r} has more than {MAX_SEEDS} seeds; split the job")
            seeds.extend(range(lo, hi + 1))
        elif part.isdigit():
            seeds.append(int(part))
        else:
            raise ValueError(f"cannot parse {part!r} in seed list {spec!r}; expected e.g. '0-49999,5,7-9'")
    if seeds and max(seeds) > MAX_SEED:
        raise ValueError(f"seed {max(seeds)} in {spec!r} is larger than {MAX_SEED} (2^63 - 1)")
    return seeds


def edm_sigmas(
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    net: Any = None,
    device: Device = "cpu",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """EDM's noise levels, shape ``(num_steps + 1,)``: ``num_steps`` levels from ``sigma_max`` down to
    ``sigma_min`` spaced uniformly in ``sigma**(1/rho)``, then a final 0.

    With ``net``, the range is first clamped to ``[net.sigma_min, net.sigma_max]`` and the levels
    pass through ``net.round_sigma``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if net is not None:
        sigma_min = max(float(sigma_min), float(getattr(net, "sigma_min", 0.0)))
        sigma_max = min(float(sigma_max), float(getattr(net, "sigma_max", math.inf)))
    if not 0 < sigma_min <= sigma_max < math.inf:
        raise ValueError(f"need 0 < sigma_min <= sigma_max < inf, got {sigma_min}, {sigma_max}")
    steps = torch.arange(num_steps, dtype=torch.float64, device=device)
    frac = steps / (num_steps - 1) if num_steps > 1 else steps
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if getattr(net, "round_sigma", None) is not None:
        t = torch.as_tensor(net.round_sigma(t)).to(device=device, dtype=torch.float64)
    return torch.cat([t, torch.zeros_like(t[:1])]).to(dtype)


def _check_sigmas(sigmas: Any, device: torch.device) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).to(device)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 levels, got shape {tuple(sigmas.shape)}")
    if not (sigmas[:-1] > 0).all() or sigmas[-1] < 0 or not (sigmas[1:] <= sigmas[:-1]).all():
        raise ValueError("sigmas must be positive (last may be 0) and non-increasing")
    return sigmas


@torch.no_grad()
def edm_sampler(
    net: Callable[..., torch.Tensor],
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    num_steps: int = 18,               # Number of noise levels before the final 0.
    sigma_min: float = 0.002,          # Lowest noise level (clamped to the net's range).
    sigma_max: float = 80.0,           # Highest noise level (clamped to the net's range).
    rho: float = 7.0,                  # Time step exponent.
    order: int = 2,                    # 2: Heun with Euler on the step to sigma=0; 1: Euler everywhere.
    S_churn: float = 0.0,              # Stochasticity strength (EDM Algorithm 2).
    S_min: float = 0.0,                # Churn only where S_min <= sigma <= S_max.
    S_max: float = math.inf,
    S_noise: float = 1.0,              # Noise inflation of the churn.
    noise: SeedNoise | None = None,    # Per-seed generators for the churn noise (needed if S_churn > 0).
    sigmas: torch.Tensor | Sequence[float] | None = None,  # Explicit levels; overrides the 5 above.
    callback: Callable[[dict], None] | None = None,  # Called at every step with a dict (see below).
    return_trajectory: bool = False,   # Also return [(sigma_hat, x, denoised), ...], one per step.
) -> torch.Tensor | tuple[torch.Tensor, list[tuple[float, torch.Tensor, torch.Tensor]]]:  # fmt: skip
    """Integrate the probability-flow ODE from ``latents * sigmas[0]`` down the levels, in float64.

    ``latents`` are standard normal, (N, C, H, W). Returns float64 samples of the same shape.

    ``callback``, as in k-diffusion's samplers, is called once per step ``i`` (after the step's first
    denoiser evaluation, before the update) with one dict: ``x`` (N, C, H, W) float64, the point the
    step starts from (after churn); ``i``; ``sigma`` (float, the level ``t_i``); ``sigma_hat`` (float,
    the level of ``x``: ``t_i`` raised by churn, else ``t_i``); ``denoised``, ``D(x; sigma_hat)``. The
    tensors are the sampler's own: read them, do not change them in place. ``return_trajectory``
    also returns the list of ``(sigma_hat, x, denoised)`` of all steps (it holds the whole path).
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (Euler) or 2 (Heun), got {order}")
    if sigmas is None:
        sigmas = edm_sigmas(num_steps, sigma_min, sigma_max, rho, net=net, device=latents.device)
    sigmas = _check_sigmas(sigmas, latents.device)
    num_steps = len(sigmas) - 1
    levels = sigmas.tolist()
    if S_churn > 0 and noise is None:
        raise ValueError("S_churn > 0 needs noise=SeedNoise(seeds, device) for the churn noise")
    round_sigma = getattr(net, "round_sigma", torch.as_tensor)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return net(x, sigma, class_labels).to(torch.float64)

    trajectory = []
    x_next = latents.to(torch.float64) * sigmas[0]
    for i in range(num_steps):
        x_cur, t_cur, t_next = x_next, sigmas[i], sigmas[i + 1]

        # Churn: raise the noise level to t_hat by adding fresh noise (drawn on every step, as EDM).
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= levels[i] <= S_max else 0.0
        t_hat = torch.as_tensor(round_sigma(t_cur + gamma * t_cur)).to(sigmas)
        x_hat = x_cur
        if S_churn > 0:
            x_hat = x_cur + (t_hat**2 - t_cur**2).clamp(min=0).sqrt() * S_noise * noise.randn_like(x_cur)

        # Euler step.
        denoised = denoise(x_hat, t_hat)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if callback is not None or return_trajectory:
            step = dict(x=x_hat, i=i, sigma=levels[i], sigma_hat=float(t_hat), denoised=denoised)
            if return_trajectory:
                trajectory.append((step["sigma_hat"], x_hat, denoised))
            if callback is not None:
                callback(step)

        # Second-order correction, except on a step that ends at sigma = 0.
        if order == 2 and levels[i + 1] > 0:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)

    return (x_next, trajectory) if return_trajectory else x_next


def _infer_device(net: Any, device: Device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(net, torch.nn.Module):
        for t in itertools.chain(net.parameters(), net.buffers()):
            return t.device
    return default_device()


def _labels_for(net: Any, class_labels: Any, idx: slice, noise: SeedNoise, device: torch.device):
    """One-hot float32 labels (n, label_dim) for a batch, or None for an unconditional net."""
    label_dim = int(getattr(net, "label_dim", 0) or 0)
    n = len(noise)
    if class_labels is None:
        if not label_dim:
            return None
        return torch.eye(label_dim, device=device)[noise.randint(label_dim).to(device)]
    if not label_dim:
        raise ValueError("class_labels given but the network is unconditional (label_dim = 0)")
    if isinstance(class_labels, int | np.integer):
        if not 0 <= int(class_labels) < label_dim:
            raise ValueError(f"class {class_labels} out of range for label_dim {label_dim}")
        return torch.eye(label_dim, device=device)[torch.full((n,), int(class_labels), device=device)]
    labels = torch.as_tensor(class_labels)[idx].to(device)
    if labels.ndim == 1:
        return torch.eye(label_dim, device=device)[labels.long()]
    return labels.to(torch.float32)


def generate(
    net: Any,
    seeds: str | Iterable[int],
    batch_size: int = 64,
    device: Device | None = None,      # None: the net's parameter device, else the default device.
    class_labels: Any = None,          # None: random per seed (EDM) if conditional; int; (N,) ints; (N, L).
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    order: int = 2,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    sigmas: torch.Tensor | Sequence[float] | None = None,
    latents: torch.Tensor | None = None,  # (N, C, H, W) initial noise instead of the seeds' (load_noise).
    noise_device: Device | None = "cpu",  # Where the per-seed noise is drawn (see the module docstring).
    out: str | os.PathLike | None = None,  # Folder or .zip for PNGs named {seed:06d}.png.
    subdirs: bool = False,             # PNGs in {seed - seed % 1000:06d}/ subfolders.
    output: str = "uint8",             # "uint8": EDM-quantised images; "float": float64 samples.
    progress: bool = False,
    skip_existing: bool = False,       # with out: reuse images already written there (a resumed job).
    record: dict | None = None,        # with out: how the images are made, kept beside them and checked.
    sampler: Callable[..., torch.Tensor] | None = None,  # not edm_sampler: sampler(net, x_T, labels, noise=)
) -> torch.Tensor:  # fmt: skip
    """Sample one image per seed in batches; returns a CPU tensor (N, C, H, W), uint8 or float64.

    With ``out`` the output is checked before any sampling and each batch is written as soon as it
    is done (a folder gets its PNGs at once; a ``.zip`` is packed at the end from a staging folder
    beside it), so a killed job keeps its finished batches; ``skip_existing`` then samples only
    the seeds whose images are missing. ``record`` (JSON-serialisable: network, sampler options) is
    stored with the images; with ``skip_existing``, images stored under another record (or none)
    are an error rather than silently mixed in. Non-finite samples (NaN weights or noise) are an error.
    ``sampler`` (e.g. a ``functools.partial`` of ``schedules.ablation_sampler``) replaces the EDM
    sampler and its arguments above (``num_steps`` ... ``sigmas``).
    """
    if output not in ("uint8", "float"):
        raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if skip_existing and (out is None or output != "uint8"):
        raise ValueError("skip_existing needs out= and output='uint8' (images are read back from PNG)")
    seeds = parse_seeds(seeds)
    device = _infer_device(net, device)
    shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
    _check_latents(latents, (len(seeds), *shape))
    writer = _ImageWriter(out, seeds, subdirs, record) if out is not None else None
    result = torch.empty((len(seeds), *shape), dtype=torch.uint8 if output == "uint8" else torch.float64)
    todo = writer.reuse(result) if skip_existing else list(range(len(seeds)))
    if writer is not None:
        writer.start()
    starts = range(0, len(todo), batch_size)
    if progress:
        starts = tqdm.tqdm(starts, unit="batch", desc="sampling")
    if sampler is None:
        options = dict(num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, order=order)
        churn = dict(S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise)
        sampler = functools.partial(edm_sampler, sigmas=sigmas, **options, **churn)
    for start in starts:
        pos = todo[start : start + batch_size]
        idx = torch.tensor(pos, dtype=torch.int64)
        noise = SeedNoise([seeds[i] for i in pos], device=device, noise_device=noise_device)
        x_T = noise.randn(shape)  # drawn even when latents are given, so labels and churn see the same stream
        if latents is not None:
            x_T = latents[idx].to(device=device, dtype=torch.float32)
        labels = _labels_for(net, class_labels, idx, noise, device)
        x = sampler(net, x_T, labels, noise=noise)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"sampling gave NaN or infinite values for seeds {_seed_list([seeds[i] for i in pos])}: "
                "the network's weights or the initial noise are not finite"
            )
        result[idx] = (to_uint8(x) if output == "uint8" else x).cpu()
        if writer is not None:
            writer.write(pos, to_uint8(x).cpu())
    if writer is not None:
        writer.finish(result if output == "uint8" else to_uint8(result))
    return result


def _check_latents(latents: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    """Given initial noise must have ``shape`` (N, C, H, W) and be finite."""
    if latents is not None and tuple(latents.shape) != shape:
        raise ValueError(f"latents shape {tuple(latents.shape)} != {shape}")
    if latents is not None and not bool(torch.isfinite(latents).all()):
        raise ValueError("latents contain NaN or infinite values")


def _seed_list(seeds: Sequence[int], k: int = 5) -> str:
    return ", ".join(map(str, seeds[:k])) + (f", ... ({len(seeds)} in all)" if len(seeds) > k else "")


class _ImageWriter:
    """Where ``generate`` puts its PNGs: checked up front, written per batch, readable on a rerun."""

    RECORD = ".nbhelpers-generate.json"

    def __init__(self, out: str | os.PathLike, seeds: Sequence[int], subdirs: bool, record: dict | None):
        self.record = None if record is None else json.loads(json.dumps(record))
        self.out = Path(out)
        self.zip = self.out.suffix.lower() == ".zip"
        self.seeds, self.subdirs = list(seeds), subdirs
        self.names = image_names(self.seeds, subdirs)
        if self.zip:  # the finished batches wait in a staging folder until the zip is packed
            check_writable(self.out)
            self.folder = self.out.parent / f".{self.out.name}.partial"
        else:
            self.folder = self.out
        check_writable(self.folder, folder=True)
        for sub in {Path(n).parent for n in self.names}:
            remove_stale_tmp(self.folder / sub)

    def _stored_record(self, packed: zipfile.ZipFile | None) -> dict | None:
        try:
            if packed is not None:
                text = packed.comment.decode("utf-8")
            elif (self.folder / self.RECORD).is_file():
                text = (self.folder / self.RECORD).read_text("utf-8")
            else:
                return None
            return json.loads(text) if text else None
        except (UnicodeDecodeError, json.JSONDecodeError, OSError, RecursionError):
            return {"unreadable": True}

    def start(self) -> None:
        if self.record is not None:
            atomic_write_text(self.folder / self.RECORD, json.dumps(self.record, indent=1, sort_keys=True))

    def write(self, positions: Sequence[int], images: torch.Tensor) -> None:
        # No fsync per image (it costs ~10 ms each): a PNG a crash left empty fails to decode on a
        # rerun and is sampled again (``reuse`` checks every file it keeps).
        for i, image in zip(positions, images.numpy()):
            with atomic_path(self.folder / self.names[i], fsync=False) as tmp:
                tmp.write_bytes(_png_bytes(image))

    def reuse(self, result: torch.Tensor) -> list[int]:
        """Fill ``result`` with the images already written (here or in the zip); the positions left."""
        packed, records = {}, []
        if self.zip and self.out.is_file():
            try:
                with zipfile.ZipFile(self.out) as zf:
                    names = set(zf.namelist()) & set(self.names)
                    packed = {n: read_zip_member(zf, n, str(self.out), 1 << 24) for n in names}
                    records.append((self.out, self._stored_record(zf)))
            except (zipfile.BadZipFile, OSError, EOFError, PickleError) as e:
                raise ValueError(
                    f"{self.out}: existing zip is unreadable ({e}); remove it to start over"
                ) from e
        present = bool(packed) or any((self.folder / n).is_file() for n in self.names)
        if present and self.folder.is_dir():
            records.append((self.folder, self._stored_record(None)))
        for where, stored in records:
            if stored != self.record:
                diff = sorted(
                    k
                    for k in {*(stored or {}), *(self.record or {})}
                    if (stored or {}).get(k) != (self.record or {}).get(k)
                )
                raise ValueError(
                    f"{where}: holds images made "
                    + (
                        f"differently ({', '.join(diff)} changed)"
                        if stored
                        else "by another or an unrecorded run"
                    )
                    + "; use another output or overwrite them"
                )
        todo = []
        for i, name in enumerate(self.names):
            path = self.folder / name
            data = packed.get(name) or (path.read_bytes() if path.is_file() else None)
            image = _png_image(data, tuple(result.shape[1:])) if data is not None else None
            if image is None:
                todo.append(i)
            else:
                result[i] = torch.from_numpy(image)
        return todo

    def finish(self, images: torch.Tensor) -> None:
        if self.zip:
            comment = json.dumps(self.record, sort_keys=True).encode() if self.record is not None else b""
            save_images(images, self.seeds, self.out, subdirs=self.subdirs, comment=comment)
            shutil.rmtree(self.folder, ignore_errors=True)


def _png_image(data: bytes, shape: tuple[int, int, int]) -> np.ndarray | None:
    """A PNG written by ``generate`` as uint8 (C, H, W), or None if it is not one of that shape."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("L", "RGB") or im.size != (shape[2], shape[1]):
                return None
            arr = np.asarray(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.array(arr, dtype=np.uint8, order="C") if arr.shape == shape else None


def image_names(names: Sequence[int | str], subdirs: bool = False) -> list[str]:
    """Relative PNG paths: seeds become ``{seed:06d}.png`` (``{seed - seed % 1000:06d}/`` with subdirs)."""
    paths = []
    for name in names:
        if isinstance(name, int | np.integer):
            seed = int(name)
            paths.append(f"{seed - seed % 1000:06d}/{seed:06d}.png" if subdirs else f"{seed:06d}.png")
        else:
            name = str(name)
            paths.append(name if os.path.splitext(name)[1] else name + ".png")
    return paths


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    if image.shape[0] == 1:
        Image.fromarray(image[0], "L").save(buf, format="PNG")
    else:
        Image.fromarray(image.transpose(1, 2, 0), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def save_images(
    images: torch.Tensor | np.ndarray,
    names: Sequence[int | str],
    out: str | os.PathLike,
    subdirs: bool = False,
    comment: bytes = b"",
) -> Path:
    """Write uint8 images (N, C, H, W), C in {1, 3}, as PNGs (mode L or RGB) into a folder or a ``.zip``.

    Every file (and the zip as a whole) is written atomically. Returns ``Path(out)``. ``comment``:
    the zip's comment (at most 64 KiB).
    """
    images = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images (N, 1|3, H, W), got {images.dtype} {images.shape}")
    paths = image_names(names, subdirs)
    if len(paths) != len(images):
        raise ValueError(f"{len(images)} images but {len(paths)} names")
    out = Path(out)
    if out.suffix.lower() == ".zip":
        with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.comment = comment
            for rel, image in zip(paths, images):
                zf.writestr(rel, _png_bytes(image))
    else:
        out.mkdir(parents=True, exist_ok=True)
        for rel, image in zip(paths, images):  # no fsync per image: ~10 ms each on some disks
            with atomic_path(out / rel, fsync=False) as tmp:
                tmp.write_bytes(_png_bytes(image))
    return out


def export_noise(seeds: str | Iterable[int], shape: Sequence[int], path: str | os.PathLike) -> Path:
    """Write the seeds' standard-normal initial noise to ``.npz``: ``seeds`` (N,) int64, ``noise``
    (N, *shape) float32; identical to the latents ``generate`` draws with ``noise_device="cpu"``."""
    seeds = parse_seeds(seeds)
    noise = SeedNoise(seeds, device="cpu").randn(shape).numpy()
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, seeds=np.asarray(seeds, dtype=np.int64), noise=noise)
    return Path(path)


def load_noise(path: str | os.PathLike) -> tuple[list[int], torch.Tensor]:
    """Read an ``export_noise`` file: ``(seeds, noise)`` with noise a float32 tensor (N, C, H, W)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such noise file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("a single array (.npy), not an .npz archive with 'seeds' and 'noise'")
        with loaded as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, AttributeError, zlib.error) as e:
        raise ValueError(f"{path}: not a readable .npz noise file ({e})") from e
    if "seeds" not in arrays or "noise" not in arrays:
        raise ValueError(f"{path}: expected arrays 'seeds' and 'noise', found {sorted(arrays)}")
    seeds, noise = arrays["seeds"], arrays["noise"]
    if seeds.ndim != 1 or noise.ndim < 2 or len(noise) != len(seeds):
        raise ValueError(f"{path}: seeds {seeds.shape} and noise {noise.shape} do not match")
    if seeds.dtype.kind not in "iu":
        raise ValueError(f"{path}: seeds must be integers, got {seeds.dtype}")
    uniq, counts = np.unique(seeds, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{path}: repeated seeds {uniq[counts > 1][:5].tolist()}")
    if noise.dtype.kind not in "fiu":
        raise ValueError(f"{path}: noise must be numbers, got {noise.dtype}")
    if not np.isfinite(noise).all():
        raise ValueError(f"{path}: noise contains NaN or infinite values")
    return [int(s) for s in seeds], torch.from_numpy(noise.astype(np.float32, copy=False))
