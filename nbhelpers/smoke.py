"""Assets of the ``smoke`` profile: the inputs of the ``paper`` code path, made here at toy size.

The paper profile reads outside files: EDM snapshot pickles (a teacher that generates the training
images, the Jacobian chapter's checkpoints), an SSCD TorchScript descriptor, an image data set and
outside sample folders. The smoke profile runs the same code on stand-ins that this module writes,
deterministically and without downloading anything:

- ``teacher-edm-ddpmpp-8x8.pkl``: a small DDPM++ (EDM preconditioning, augmentation, dropout 0.13)
  trained for a few seconds on colour blobs, written as NVlabs' ``torch_utils.persistence`` pickles a
  snapshot (``nbhelpers.edm_pickle``);
- ``vp-ddpmpp-8x8.pkl``: a second, smaller snapshot, DDPM++ with VP preconditioning, random weights;
- ``sscd-tiny.torchscript.pt``: a TorchScript model with SSCD's interface (normalised RGB images in,
  unit-norm descriptors out);
- ``teacher-images-8x8.zip``: an EDM data set of the teacher's samples for seeds 0..63;
- ``outside/teacher-heun`` (a folder) and ``outside/teacher-euler.zip``: the teacher's samples at the
  evaluation seeds ``OUTSIDE_SEEDS``, PNGs named by seed, as samples made elsewhere arrive.

Everything is drawn from fixed seeds on the CPU, so a rebuild gives the same weights and images
(the pickles' bytes are not reproducible: torch records storages under their memory addresses, as
in EDM's own files). The profile checks structure, not science. ``manifest.json`` records a SHA-256
per file; :func:`ensure_assets` rebuilds the folder when a file is missing or changed, under a lock
so that parallel notebooks build it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from .atomic import atomic_path, atomic_write_text
from .data import synthetic_dataset
from .edm_pickle import Persistent, write_snapshot
from .networks import make_network
from .profiles import repo_root
from .sampling import generate
from .training import TrainConfig, train

__all__ = [
    "ASSETS_VERSION",
    "ENV_VAR",
    "FILES",
    "OUTSIDE_SEEDS",
    "asset_dir",
    "ensure_assets",
    "make_assets",
    "verify_assets",
]

ASSETS_VERSION = 2
ENV_VAR = "NBHELPERS_SMOKE_ASSETS"
RESOLUTION = 8
TEACHER_IMAGES = 64
OUTSIDE_SEEDS = "100000-100015"  # the smoke profile's evaluation seeds of model_similarity
FILES = {
    "teacher": "teacher-edm-ddpmpp-8x8.pkl",
    "checkpoint_vp": "vp-ddpmpp-8x8.pkl",
    "sscd": "sscd-tiny.torchscript.pt",
    "images": "teacher-images-8x8.zip",
    "outside_heun": "outside/teacher-heun",
    "outside_euler": "outside/teacher-euler.zip",
}
MANIFEST = "manifest.json"
_NETWORK = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.13)
_SMALL_NETWORK = dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.13)
_TEACHER_STEPS = 60
_EDM_AUGMENT = dict(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


def asset_dir() -> Path:
    """The asset folder: ``$NBHELPERS_SMOKE_ASSETS``, else ``<repo>/.cache/smoke``."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else repo_root() / ".cache" / "smoke"


class _TinySSCD(torch.nn.Module):
    """SSCD's interface at toy size: (N, 3, H, W) ImageNet-normalised images -> (N, 64) unit-norm.

    Each image is centred, filtered by zero-sum convolutions, pooled to 4 x 4 and projected, so the
    descriptors of different images point in different directions (as SSCD's do)."""

    def __init__(self, generator: torch.Generator):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.fc = torch.nn.Linear(3 * 16 + 8 * 16, 64, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
            self.conv.weight.sub_(self.conv.weight.mean(dim=(1, 2, 3), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(dim=(1, 2, 3), keepdim=True)
        pooled = torch.nn.functional.adaptive_avg_pool2d
        h = torch.cat([pooled(x, 4).flatten(1), pooled(torch.tanh(self.conv(x)), 4).flatten(1)], dim=1)
        return torch.nn.functional.normalize(self.fc(h), dim=1)


def _blobs(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` uint8 images (n, 3, R, R): one soft colour blob each on black."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(0, 1, RESOLUTION, dtype=torch.float64)
    cy, cx = (0.2 + 0.6 * torch.rand(2, n, 1, 1, generator=g, dtype=torch.float64)).unbind(0)
    blob = torch.exp(-((grid[:, None] - cy) ** 2 + (grid[None, :] - cx) ** 2) / 0.05)
    colour = torch.rand(n, 3, 1, 1, generator=g, dtype=torch.float64)
    return (255 * blob[:, None] * colour).to(torch.uint8)


def _teacher_net() -> torch.nn.Module:
    """The teacher: a DDPM++ trained briefly on blobs (EDM preconditioning, augmentation and dropout)."""
    cfg = TrainConfig(
        arch="ddpmpp",
        precond="edm",
        network=dict(_NETWORK),
        total_steps=_TEACHER_STEPS,
        batch_size=32,
        lr=5e-3,
        lr_rampup_kimg=0,
        ema_beta=0.9,
        augment_p=0.12,
        seed=0,
        log_every=_TEACHER_STEPS,
    )
    return train(cfg, _blobs(256), device="cpu", progress=False).ema


def _random_net(arch: str, precond: str, seed: int) -> torch.nn.Module:
    """A small network of this project with random weights moved away from the init (outputs not ~0)."""
    g = torch.Generator().manual_seed(seed)
    net = make_network(arch, precond, RESOLUTION, 3, augment_dim=9, generator=g, **_SMALL_NETWORK)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval().requires_grad_(False)


def _write_snapshot(path: Path, net: torch.nn.Module) -> None:
    state = dict(_EDM_AUGMENT, _init_args=(), _init_kwargs=dict(_EDM_AUGMENT))
    dataset_kwargs = dict(
        class_name="training.dataset.ImageFolderDataset",
        path="datasets/smoke-8x8.zip",
        use_labels=False,
        xflip=False,
        cache=True,
        resolution=RESOLUTION,
        max_size=TEACHER_IMAGES,
    )
    write_snapshot(path, net, augment_pipe=Persistent("AugmentPipe", state), dataset_kwargs=dataset_kwargs)


def make_assets(folder: str | os.PathLike) -> dict[str, str]:
    """Write every asset into ``folder`` (replacing what is there) and its manifest; returns the manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is as fast, and immune to a busy machine
    try:
        return _make_assets(folder)
    finally:
        torch.set_num_threads(threads)


def _make_assets(folder: Path) -> dict[str, str]:
    teacher = _teacher_net()
    _write_snapshot(folder / FILES["teacher"], teacher)
    _write_snapshot(folder / FILES["checkpoint_vp"], _random_net("ddpmpp", "vp", seed=2))
    with atomic_path(folder / FILES["sscd"]) as tmp:
        torch.jit.script(_TinySSCD(torch.Generator().manual_seed(3))).save(str(tmp))
    synthetic_dataset(
        teacher, TEACHER_IMAGES, folder / FILES["images"], batch_size=64, device="cpu", overwrite=True
    )
    shutil.rmtree(folder / FILES["outside_heun"], ignore_errors=True)
    for key, order in (("outside_heun", 2), ("outside_euler", 1)):
        generate(teacher, OUTSIDE_SEEDS, batch_size=64, device="cpu", order=order, out=folder / FILES[key])
    files = _hashes(folder)
    atomic_write_text(folder / MANIFEST, json.dumps({"version": ASSETS_VERSION, "files": files}, indent=1))
    return files


def _hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every asset file under ``folder`` (relative POSIX path -> hex digest)."""
    out = {}
    for key in FILES.values():
        path = folder / key
        for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if p.is_file():
                out[p.relative_to(folder).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def verify_assets(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds this version's assets exactly as its manifest lists them."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("version") != ASSETS_VERSION:
        return False
    files = manifest.get("files")
    return isinstance(files, dict) and bool(files) and files == _hashes(folder)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): builds may race, each is complete and atomic
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_assets(folder: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Make the smoke assets in ``folder`` (default :func:`asset_dir`) unless they are there and intact."""
    folder = Path(folder) if folder is not None else asset_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / ".lock"):
        if force or not verify_assets(folder):
            make_assets(folder)
    return folder
